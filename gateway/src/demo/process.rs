//! The program behind a demo VM's session channel: a shell or command in a pty or on pipes, its
//! output relayed to the channel, then exit-status (or exit-signal), EOF and close.

use std::net::SocketAddr;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use russh::server::Handle;
use russh::{ChannelId, Sig};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::ShellSettings;

/// A pty request: terminal type and size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct PtySize {
    pub term: String,
    pub cols: u16,
    pub rows: u16,
}

/// What to run.
#[derive(Debug, Clone)]
pub(super) enum Launch {
    /// The user's interactive shell.
    Shell,
    /// `shell -c COMMAND`.
    Command(String),
    /// A program run directly (the sftp server).
    Program(PathBuf),
}

/// Everything needed to start a session's program.
#[derive(Debug, Clone)]
pub(super) struct Request {
    pub vm: Arc<str>,
    /// The VM's start it runs on (`super::INSTANCE_VAR`).
    pub instance: Arc<str>,
    pub login: String,
    pub client: SocketAddr,
    pub pty: Option<PtySize>,
    pub env: Vec<(String, String)>,
    pub launch: Launch,
}

/// Channel traffic for the program.
#[derive(Debug)]
pub(super) enum Input {
    /// Bytes for its stdin (or the terminal).
    Data(Bytes),
    /// The client will send no more input.
    Eof,
    /// The terminal changed size.
    Resize { cols: u16, rows: u16 },
    /// Deliver a signal.
    Signal(Sig),
}

/// Where input goes.
enum Stdin {
    Pty(pty_process::OwnedWritePty),
    Pipe(Option<tokio::process::ChildStdin>),
}

/// Starts the program and a task that serves it; returns where to send channel traffic. The task
/// ends (killing the program) when the sender is dropped.
pub(super) fn spawn(
    request: Request,
    shell: &ShellSettings,
    channel: ChannelId,
    handle: Handle,
) -> std::io::Result<mpsc::Sender<Input>> {
    let (program, args) = command_line(&request.launch, shell, request.pty.is_some());
    let env = environment(&request, shell);
    let (tx, rx) = mpsc::channel(16);
    match &request.pty {
        Some(size) => {
            let (pty, pts) = pty_process::open().map_err(std::io::Error::other)?;
            pty.resize(pty_process::Size::new(
                default_dim(size.rows, 24),
                default_dim(size.cols, 80),
            ))
            .map_err(std::io::Error::other)?;
            let child = pty_process::Command::new(&program)
                .args(&args)
                .env_clear()
                .envs(env)
                .current_dir(&shell.home)
                .kill_on_drop(true)
                .spawn(pts)
                .map_err(std::io::Error::other)?;
            let (read, write) = pty.into_split();
            let output = vec![pump(read, handle.clone(), channel, None)];
            tokio::spawn(serve(child, Stdin::Pty(write), output, rx, handle, channel));
        }
        None => {
            // A session of its own, as sshd gives one: no controlling terminal (so a terminal's
            // Ctrl-C does not reach it, and a prompt for a password fails instead of reading
            // poolgate's terminal). util-linux's `setsid` does that and then runs the program in
            // the same process; without it the program shares poolgate's session.
            let mut command = match &shell.setsid {
                Some(setsid) => {
                    let mut c = tokio::process::Command::new(setsid);
                    c.arg(&program);
                    c
                }
                None => tokio::process::Command::new(&program),
            };
            let mut child = command
                .args(&args)
                .env_clear()
                .envs(env)
                .current_dir(&shell.home)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .kill_on_drop(true)
                .spawn()?;
            let stdin = child.stdin.take();
            let mut output = Vec::new();
            if let Some(out) = child.stdout.take() {
                output.push(pump(out, handle.clone(), channel, None));
            }
            if let Some(err) = child.stderr.take() {
                output.push(pump(err, handle.clone(), channel, Some(1)));
            }
            tokio::spawn(serve(
                child,
                Stdin::Pipe(stdin),
                output,
                rx,
                handle,
                channel,
            ));
        }
    }
    tracing::info!(vm = %request.vm, login = %request.login, client = %request.client, program = %program.display(), pty = request.pty.is_some(), "demo VM: session program started");
    Ok(tx)
}

fn default_dim(value: u16, default: u16) -> u16 {
    if value == 0 { default } else { value }
}

/// Program and arguments, as sshd runs them: the login shell, `-c COMMAND` for exec.
fn command_line(launch: &Launch, shell: &ShellSettings, pty: bool) -> (PathBuf, Vec<String>) {
    let is_bash = shell.program.file_name().is_some_and(|n| n == "bash");
    match launch {
        Launch::Shell => {
            let mut args = Vec::new();
            if let (Some(rc), true) = (&shell.bash_rc, is_bash) {
                args.push("--rcfile".to_string());
                args.push(rc.display().to_string());
            }
            if pty {
                args.push("-i".to_string());
            }
            (shell.program.clone(), args)
        }
        Launch::Command(command) => (shell.program.clone(), vec!["-c".into(), command.clone()]),
        Launch::Program(program) => (program.clone(), Vec::new()),
    }
}

/// A clean environment: the account's basics, the client's accepted variables, the VM's name.
fn environment(request: &Request, shell: &ShellSettings) -> Vec<(String, String)> {
    let mut env = vec![
        (
            "PATH".to_string(),
            std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".to_string()),
        ),
        ("HOME".to_string(), shell.home.display().to_string()),
        ("USER".to_string(), shell.user.clone()),
        ("LOGNAME".to_string(), shell.user.clone()),
        ("SHELL".to_string(), shell.program.display().to_string()),
    ];
    for name in ["LANG", "LC_ALL", "TZ"] {
        if let Ok(value) = std::env::var(name) {
            env.push((name.to_string(), value));
        }
    }
    env.extend(request.env.iter().cloned());
    if let Some(pty) = &request.pty {
        env.push(("TERM".to_string(), pty.term.clone()));
    }
    env.push(("POOLGATE_VM".to_string(), request.vm.to_string()));
    env.push((
        super::INSTANCE_VAR.to_string(),
        request.instance.to_string(),
    ));
    env.push(("POOLGATE_DEMO_LOGIN".to_string(), request.login.clone()));
    env.push((
        "PS1".to_string(),
        format!("{}@{}:\\w\\$ ", shell.user, request.vm),
    ));
    env.push((
        "SSH_CLIENT".to_string(),
        format!("{} {} 22", request.client.ip(), request.client.port()),
    ));
    env
}

/// Relays `from` to the channel (`ext` = 1 for stderr) until EOF or an error (a pty reports EIO
/// once the program and its children have closed it).
fn pump<R>(mut from: R, handle: Handle, channel: ChannelId, ext: Option<u32>) -> JoinHandle<()>
where
    R: AsyncRead + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let chunk = Bytes::copy_from_slice(buf.get(..n).unwrap_or_default());
            let sent = match ext {
                Some(ext) => handle.extended_data(channel, ext, chunk).await,
                None => handle.data(channel, chunk).await,
            };
            if sent.is_err() {
                return;
            }
        }
    })
}

/// Feeds input to the program until it exits, then reports how it ended and closes the channel.
/// Returns early (the child is killed on drop) when the client goes away.
async fn serve(
    mut child: tokio::process::Child,
    mut stdin: Stdin,
    output: Vec<JoinHandle<()>>,
    mut input: mpsc::Receiver<Input>,
    handle: Handle,
    channel: ChannelId,
) {
    let pid = child.id();
    let status = loop {
        tokio::select! {
            status = child.wait() => break status,
            event = input.recv() => match event {
                None => {
                    for task in &output {
                        task.abort();
                    }
                    return;
                }
                Some(Input::Data(data)) => write_input(&mut stdin, &data).await,
                Some(Input::Eof) => {
                    if let Stdin::Pipe(pipe) = &mut stdin {
                        *pipe = None;
                    }
                }
                Some(Input::Resize { cols, rows }) => {
                    if let Stdin::Pty(pty) = &stdin {
                        let _ = pty.resize(pty_process::Size::new(default_dim(rows, 24), default_dim(cols, 80)));
                    }
                }
                Some(Input::Signal(sig)) => {
                    if let (Some(pid), Some(signal)) = (pid, to_signal(&sig)) {
                        let _ = i32::try_from(pid).map(|pid| kill(Pid::from_raw(pid), signal));
                    }
                }
            }
        }
    };
    // Let the output drain: pipes until EOF; a pty until EIO, bounded in case a background job
    // keeps the terminal open.
    let bound = match stdin {
        Stdin::Pty(_) => Duration::from_secs(2),
        Stdin::Pipe(_) => Duration::from_secs(3600),
    };
    drop(stdin);
    for task in output {
        let _ = tokio::time::timeout(bound, task).await;
    }
    match status {
        Ok(status) => report_exit(&handle, channel, status).await,
        Err(e) => tracing::warn!(error = %e, "demo VM: waiting for the session program failed"),
    }
    let _ = handle.eof(channel).await;
    let _ = handle.close(channel).await;
}

async fn write_input(stdin: &mut Stdin, data: &[u8]) {
    let ok = match stdin {
        Stdin::Pty(pty) => write_all(pty, data).await,
        Stdin::Pipe(Some(pipe)) => write_all(pipe, data).await,
        Stdin::Pipe(None) => true,
    };
    if !ok && let Stdin::Pipe(pipe) = stdin {
        // The program closed its stdin: drop further input.
        *pipe = None;
    }
}

async fn write_all<W: AsyncWrite + Unpin>(to: &mut W, data: &[u8]) -> bool {
    to.write_all(data).await.is_ok() && to.flush().await.is_ok()
}

async fn report_exit(handle: &Handle, channel: ChannelId, status: ExitStatus) {
    if let Some(code) = status.code() {
        let _ = handle
            .exit_status_request(channel, u32::try_from(code).unwrap_or(255))
            .await;
    } else if let Some(signal) = status.signal() {
        let _ = handle
            .exit_signal_request(
                channel,
                to_sig(signal),
                status.core_dumped(),
                String::new(),
                "en".into(),
            )
            .await;
    }
}

fn to_signal(sig: &Sig) -> Option<Signal> {
    Some(match sig {
        Sig::ABRT => Signal::SIGABRT,
        Sig::ALRM => Signal::SIGALRM,
        Sig::FPE => Signal::SIGFPE,
        Sig::HUP => Signal::SIGHUP,
        Sig::ILL => Signal::SIGILL,
        Sig::INT => Signal::SIGINT,
        Sig::KILL => Signal::SIGKILL,
        Sig::PIPE => Signal::SIGPIPE,
        Sig::QUIT => Signal::SIGQUIT,
        Sig::SEGV => Signal::SIGSEGV,
        Sig::TERM => Signal::SIGTERM,
        Sig::USR1 => Signal::SIGUSR1,
        Sig::Custom(name) => match name.as_str() {
            "USR2" => Signal::SIGUSR2,
            "CONT" => Signal::SIGCONT,
            "STOP" => Signal::SIGSTOP,
            "WINCH" => Signal::SIGWINCH,
            _ => return None,
        },
    })
}

fn to_sig(signal: i32) -> Sig {
    match Signal::try_from(signal) {
        Ok(Signal::SIGABRT) => Sig::ABRT,
        Ok(Signal::SIGALRM) => Sig::ALRM,
        Ok(Signal::SIGFPE) => Sig::FPE,
        Ok(Signal::SIGHUP) => Sig::HUP,
        Ok(Signal::SIGILL) => Sig::ILL,
        Ok(Signal::SIGINT) => Sig::INT,
        Ok(Signal::SIGKILL) => Sig::KILL,
        Ok(Signal::SIGPIPE) => Sig::PIPE,
        Ok(Signal::SIGQUIT) => Sig::QUIT,
        Ok(Signal::SIGSEGV) => Sig::SEGV,
        Ok(Signal::SIGTERM) => Sig::TERM,
        Ok(Signal::SIGUSR1) => Sig::USR1,
        Ok(other) => Sig::Custom(other.as_str().trim_start_matches("SIG").to_string()),
        Err(_) => Sig::Custom(signal.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shell(program: &str) -> ShellSettings {
        ShellSettings {
            program: PathBuf::from(program),
            home: PathBuf::from("/home/u"),
            user: "u".into(),
            bash_rc: Some(PathBuf::from("/state/bashrc")),
            sftp_server: None,
            setsid: None,
        }
    }

    #[test]
    fn bash_shells_load_the_demo_rc_file() {
        let (program, args) = command_line(&Launch::Shell, &shell("/bin/bash"), true);
        assert_eq!(program, PathBuf::from("/bin/bash"));
        assert_eq!(args, ["--rcfile", "/state/bashrc", "-i"]);
        let (_, args) = command_line(&Launch::Shell, &shell("/bin/zsh"), true);
        assert_eq!(args, ["-i"]);
        let (_, args) = command_line(&Launch::Command("echo hi".into()), &shell("/bin/sh"), false);
        assert_eq!(args, ["-c", "echo hi"]);
    }

    #[test]
    fn environment_names_the_vm_and_hides_the_gateways() {
        let request = Request {
            vm: Arc::from("demo-2"),
            instance: Arc::from("42-demo-2-7"),
            login: "alice".into(),
            client: "127.0.0.1:5555".parse().unwrap_or_else(|_| unreachable!()),
            pty: Some(PtySize {
                term: "xterm".into(),
                cols: 80,
                rows: 24,
            }),
            // A client cannot pass for another VM's process: the VM's own tag comes last.
            env: vec![
                ("LANG".into(), "C.UTF-8".into()),
                (super::super::INSTANCE_VAR.into(), "other".into()),
            ],
            launch: Launch::Shell,
        };
        let env = environment(&request, &shell("/bin/bash"));
        let get = |k: &str| {
            env.iter()
                .rev()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(get("POOLGATE_VM").as_deref(), Some("demo-2"));
        assert_eq!(
            get(super::super::INSTANCE_VAR).as_deref(),
            Some("42-demo-2-7")
        );
        assert_eq!(get("TERM").as_deref(), Some("xterm"));
        assert_eq!(get("LANG").as_deref(), Some("C.UTF-8"));
        assert!(get("PS1").is_some_and(|p| p.contains("demo-2")));
        assert!(get("POOLGATE_LOG").is_none());
    }

    #[test]
    fn signals_round_trip() {
        for sig in [Sig::INT, Sig::TERM, Sig::KILL, Sig::HUP, Sig::USR1] {
            let signal = to_signal(&sig).unwrap_or(Signal::SIGSYS);
            assert_eq!(format!("{:?}", to_sig(signal as i32)), format!("{sig:?}"));
        }
        assert_eq!(
            format!("{:?}", to_sig(Signal::SIGUSR2 as i32)),
            format!("{:?}", Sig::Custom("USR2".into()))
        );
    }
}
