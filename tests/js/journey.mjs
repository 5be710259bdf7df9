// Browser journey through poolgate: headless Debian Chromium driven by playwright-core logs into
// JupyterHub, opens JupyterLab, runs `1+1` in a new notebook and waits for `2`.
//
//   node journey.mjs --url https://localhost:8443 --user ann --password pw \
//        --spki <base64 sha256 of the gateway key> --screenshot out.png --profile /tmp/dir
//
// Never downloads a browser: it runs /usr/bin/chromium (or $CHROMIUM). Prints `RESULT <text>`
// with the cell output on success; exits 1 with the reason otherwise.
import { chromium } from 'playwright-core';

function args() {
  const out = {};
  const argv = process.argv.slice(2);
  for (let i = 0; i < argv.length; i += 2) out[argv[i].replace(/^--/, '')] = argv[i + 1];
  for (const k of ['url', 'user', 'password', 'screenshot', 'profile']) {
    if (!out[k]) throw new Error(`missing --${k}`);
  }
  return out;
}

const a = args();
const step = (s) => console.log(`STEP ${s}`);
const chromeArgs = [
  '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
  '--disable-dev-shm-usage',
];
// Trust exactly the gateway's key (the test CA is not in Chromium's store).
if (a.spki) chromeArgs.push(`--ignore-certificate-errors-spki-list=${a.spki}`);

const context = await chromium.launchPersistentContext(a.profile, {
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
  args: chromeArgs,
  viewport: { width: 1280, height: 800 },
});
let page;
try {
  page = context.pages()[0] || (await context.newPage());
  page.setDefaultTimeout(60_000);
  step('login page');
  await page.goto(`${a.url}/hub/login`);
  await page.fill('#username_input', a.user);
  await page.fill('#password_input', a.password);
  step('log in');
  await Promise.all([page.waitForURL(/\/(hub\/spawn|hub\/home|user\/)/, { timeout: 60_000 }), page.click('#login_submit')]);
  step('open JupyterLab');
  // After login the hub spawns the server (spawn-pending page, progress events) and
  // redirects to JupyterLab.
  if (!page.url().includes(`/user/${a.user}/lab`)) {
    await page.goto(`${a.url}/user/${a.user}/lab`);
  }
  await page.waitForURL(new RegExp(`/user/${a.user}/lab`), { timeout: 120_000 });
  await page.waitForSelector('.jp-LauncherCard', { timeout: 120_000 });
  step('new notebook');
  await page.click('.jp-LauncherCard[data-category="Notebook"]');
  const editor = page.locator('.jp-Notebook .jp-Cell .cm-content').first();
  await editor.waitFor({ timeout: 60_000 });
  // The kernel starts (and its websocket connects through the gateway) before we run anything.
  step('wait for the kernel');
  await page.getByText(/\| Idle/).first().waitFor({ timeout: 120_000 });
  step('run 1+1');
  await editor.click();
  await page.keyboard.type('1+1');
  await page.waitForFunction(
    () => document.querySelector('.jp-Notebook .jp-Cell .cm-content')?.textContent?.includes('1+1'),
    null, { timeout: 30_000 });
  await page.keyboard.press('Shift+Enter');
  const output = page.locator('.jp-OutputArea-output').first();
  try {
    await output.waitFor({ timeout: 60_000 });
  } catch (e) {
    const status = await page.locator('.jp-StatusBar-Widget').allInnerTexts().catch(() => []);
    throw new Error(`no output after 60 s; status bar: ${JSON.stringify(status)}; ${e.message}`);
  }
  const text = (await output.innerText()).trim();
  await page.screenshot({ path: a.screenshot, fullPage: false });
  console.log(`RESULT ${text}`);
  await context.close();
  process.exit(text === '2' ? 0 : 1);
} catch (e) {
  console.log(`FAILED ${e && e.message ? e.message : e}`);
  if (page) {
    console.log(`URL ${page.url()}`);
    await page.screenshot({ path: a.screenshot, fullPage: false }).catch(() => {});
  }
  await context.close().catch(() => {});
  process.exit(1);
}
