//! Relaying one SSH channel between the user's connection (russh server side) and the VM's
//! connection (russh client side), with flow control that is deadlock-free and memory-bounded.
//!
//! # Why this is not a pair of `copy` loops
//!
//! russh (0.65) replenishes a channel's SSH window as soon as a packet *arrives* and then hands the
//! packet to a bounded per-channel queue; when that queue is full, the whole session loop waits.
//! Two naive pumps between two session loops therefore deadlock when both directions are full
//! (the user→VM pump waits for VM window, which only the VM-side loop can deliver, while that
//! loop waits for the VM→user pump, which waits for user window, which only the user-side loop can
//! deliver, which waits for the user→VM pump). Unbounded queues instead let a slow reader pile up
//! the whole transfer in memory.
//!
//! # The design
//!
//! * **VM → user** is back-pressured by TCP: the down pump sends a packet to the user and only then
//!   reads the next one from the VM channel. While the user's window is closed, the VM-side loop
//!   stops at the (small) channel queue and stops reading the VM's socket. Memory: the queue.
//! * **User → VM** goes through a byte-counted buffer. The up reader stops taking packets from the
//!   user channel when the buffer holds `HIGH_WATER` bytes — which in turn stops the user-side loop
//!   and so reads from the user's socket — *unless* a down pump of the same connection is in the
//!   middle of sending to the user. In that case the user-side loop must keep running, because
//!   the user's WINDOW_ADJUST that the down pump waits for may sit behind user data in the stream.
//!   This breaks the only cycle: the user-side loop never waits while anything waits for it.
//! * While over `HIGH_WATER`, [`FlowControl::target_window`] shrinks the window russh grants the
//!   user (`Handler::adjust_window`) to a trickle, so the overflow in that state grows by a few
//!   bytes per round trip at most; past `HARD_LIMIT` the reader also paces itself, so even a client
//!   that writes forever without reading cannot grow the buffer faster than a few bytes a second,
//!   while its window adjustments still get through.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use russh::{Channel, ChannelMsg, ChannelWriteHalf, Sig};
use tokio::sync::{Notify, mpsc};

/// Bytes buffered per channel (user → VM) before the gateway stops reading from the user.
pub const HIGH_WATER: usize = 1 << 20;
/// Past this, the reader only takes one packet per [`PACE`].
pub const HARD_LIMIT: usize = 4 << 20;
/// Pace of the reader past [`HARD_LIMIT`].
const PACE: Duration = Duration::from_millis(50);
/// Window granted to the user while some channel is over [`HIGH_WATER`] (russh ignores 0, and 1
/// would never trigger another adjustment).
const TRICKLE_WINDOW: u32 = 2;

/// Flow-control state shared by all channels of one user connection.
#[derive(Debug, Default)]
pub struct FlowControl {
    /// Down pumps currently inside a send to the user.
    sending_down: AtomicUsize,
    /// Channels whose user→VM buffer is over [`HIGH_WATER`].
    congested: AtomicUsize,
    notify: Notify,
}

impl FlowControl {
    /// The window to grant the user next (`server::Handler::adjust_window`).
    pub fn target_window(&self, normal: u32) -> u32 {
        if self.congested.load(Ordering::Acquire) > 0 {
            TRICKLE_WINDOW
        } else {
            normal
        }
    }

    fn down_send_started(&self) {
        self.sending_down.fetch_add(1, Ordering::AcqRel);
        self.notify.notify_waiters();
    }

    fn down_send_finished(&self) {
        self.sending_down.fetch_sub(1, Ordering::AcqRel);
    }

    fn down_busy(&self) -> bool {
        self.sending_down.load(Ordering::Acquire) > 0
    }
}

/// Callbacks into the rest of the gateway for things a channel relay cannot do on its own.
pub trait UserSide: Send + Sync + 'static {
    /// Replies to the user's channel request (positional, like SSH itself).
    fn reply(&self, channel: russh::ChannelId, success: bool) -> impl Future<Output = ()> + Send;
    /// Sends exit-status.
    fn exit_status(
        &self,
        channel: russh::ChannelId,
        status: u32,
    ) -> impl Future<Output = ()> + Send;
    /// Sends exit-signal.
    fn exit_signal(
        &self,
        channel: russh::ChannelId,
        signal: Sig,
        core_dumped: bool,
        message: String,
    ) -> impl Future<Output = ()> + Send;
    /// Counts relayed bytes (up = user → VM).
    fn bytes(&self, up: u64, down: u64);
    /// Records an exit status seen on a session channel.
    fn exited(&self, status: Option<u32>, signal: Option<String>);
    /// The text written to the user's stderr when the VM connection vanishes under a channel.
    fn vm_lost_message(&self) -> String;
}

/// What the up pump forwards to the VM, in order.
enum Up {
    Data(Bytes),
    Ext(u32, Bytes),
    Eof,
    Pty {
        term: String,
        cols: u32,
        rows: u32,
        px_w: u32,
        px_h: u32,
        modes: Vec<(russh::Pty, u32)>,
    },
    Env(String, String),
    Shell,
    Exec(Vec<u8>),
    Subsystem(String),
    WindowChange(u32, u32, u32, u32),
    Signal(Sig),
    Agent,
    X11,
    Close,
}

impl Up {
    fn bytes(&self) -> usize {
        match self {
            Up::Data(b) | Up::Ext(_, b) => b.len(),
            _ => 0,
        }
    }
}

/// Which requests the user expects a reply to (OpenSSH: pty-req, shell, exec, subsystem; env,
/// window-change and signal never; the agent request is answered by russh itself).
fn wants_reply(item: &Up) -> bool {
    matches!(
        item,
        Up::Pty { .. } | Up::Shell | Up::Exec(_) | Up::Subsystem(_) | Up::X11
    )
}

/// Relays one channel until both directions are closed.
///
/// The relay's state machine (a few KiB) lives in its own allocation, so the tasks that await it
/// — and hold it for the whole life of an idle session — do not carry it inline next to their
/// other states.
pub async fn relay<U, S, C>(
    user: Channel<S>,
    vm: Channel<C>,
    flow: Arc<FlowControl>,
    side: Arc<U>,
    session_channel: bool,
    allow_agent: bool,
) where
    U: UserSide,
    S: From<(russh::ChannelId, ChannelMsg)> + Send + Sync + 'static,
    C: From<(russh::ChannelId, ChannelMsg)> + Send + Sync + 'static,
{
    Box::pin(run(user, vm, flow, side, session_channel, allow_agent)).await;
}

async fn run<U, S, C>(
    user: Channel<S>,
    vm: Channel<C>,
    flow: Arc<FlowControl>,
    side: Arc<U>,
    session_channel: bool,
    allow_agent: bool,
) where
    U: UserSide,
    S: From<(russh::ChannelId, ChannelMsg)> + Send + Sync + 'static,
    C: From<(russh::ChannelId, ChannelMsg)> + Send + Sync + 'static,
{
    let user_id = user.id();
    let (mut user_rx, user_tx) = user.split();
    let (mut vm_rx, vm_tx) = vm.split();
    let buffered = Arc::new(AtomicUsize::new(0));
    let drained = Arc::new(Notify::new());
    let (queue_tx, queue_rx) = mpsc::unbounded_channel::<Up>();

    // The three pumps are closures that make their futures only where they are awaited, so each
    // state machine exists once inside this one, not also as a moved-from local.

    // Up reader: user channel -> byte-counted queue, with the admission rule described above.
    let reader = {
        let flow = flow.clone();
        let buffered = buffered.clone();
        let drained = drained.clone();
        move || async move {
            let mut congested = false;
            loop {
                admit(&flow, &buffered, &drained, &mut congested).await;
                let Some(msg) = user_rx.wait().await else {
                    let _ = queue_tx.send(Up::Close);
                    break;
                };
                let item = match msg {
                    ChannelMsg::Data { data } => Up::Data(data),
                    ChannelMsg::ExtendedData { data, ext } => Up::Ext(ext, data),
                    ChannelMsg::Eof => Up::Eof,
                    ChannelMsg::Close => Up::Close,
                    ChannelMsg::RequestPty {
                        term,
                        col_width,
                        row_height,
                        pix_width,
                        pix_height,
                        terminal_modes,
                        ..
                    } => Up::Pty {
                        term,
                        cols: col_width,
                        rows: row_height,
                        px_w: pix_width,
                        px_h: pix_height,
                        modes: terminal_modes,
                    },
                    ChannelMsg::SetEnv {
                        variable_name,
                        variable_value,
                        ..
                    } => Up::Env(variable_name, variable_value),
                    ChannelMsg::RequestShell { .. } => Up::Shell,
                    ChannelMsg::Exec { command, .. } => Up::Exec(command),
                    ChannelMsg::RequestSubsystem { name, .. } => Up::Subsystem(name),
                    ChannelMsg::WindowChange {
                        col_width,
                        row_height,
                        pix_width,
                        pix_height,
                    } => Up::WindowChange(col_width, row_height, pix_width, pix_height),
                    ChannelMsg::Signal { signal } => Up::Signal(signal),
                    ChannelMsg::AgentForward { .. } => Up::Agent,
                    ChannelMsg::RequestX11 { .. } => Up::X11,
                    _ => continue,
                };
                let closing = matches!(item, Up::Close);
                buffered.fetch_add(item.bytes(), Ordering::AcqRel);
                if queue_tx.send(item).is_err() || closing {
                    break;
                }
            }
            if congested {
                flow.congested.fetch_sub(1, Ordering::AcqRel);
            }
        }
    };

    // Up writer: queue -> VM channel, in order; waits for the VM's window.
    let writer = {
        let side = side.clone();
        let buffered = buffered.clone();
        let drained = drained.clone();
        let vm_tx = &vm_tx;
        move || async move {
            let mut queue_rx = queue_rx;
            while let Some(item) = queue_rx.recv().await {
                let n = item.bytes();
                let reply_expected = wants_reply(&item);
                let ok = match item {
                    // The hot path stays inline; requests (rare, with large futures) are boxed
                    // so the writer's state stays small for the life of the channel.
                    Up::Data(data) => sent(vm_tx.data_bytes(data).await),
                    Up::Ext(ext, data) => sent(vm_tx.extended_data_bytes(ext, data).await),
                    item => Box::pin(forward_up(vm_tx, item, session_channel, allow_agent)).await,
                };
                if n > 0 {
                    buffered.fetch_sub(n, Ordering::AcqRel);
                    drained.notify_one();
                    side.bytes(n as u64, 0);
                }
                match ok {
                    Forward::Sent => {}
                    Forward::Refused if reply_expected => {
                        // Not sent to the VM: answer the user ourselves.
                        Box::pin(side.reply(user_id, false)).await;
                    }
                    Forward::Refused => {}
                    Forward::Closed => break,
                }
            }
        }
    };

    // Down pump: VM channel -> user, one packet at a time.
    let down = {
        let flow = flow.clone();
        let side = side.clone();
        let user_tx = &user_tx;
        move || async move {
            let mut exit_status = None;
            let mut exit_signal = None;
            let mut held_eof = false;
            // Ends with the VM's Close, or with `None` when the VM connection itself is gone.
            let mut vm_closed = false;
            while let Some(msg) = vm_rx.wait().await {
                match msg {
                    ChannelMsg::Data { data } => {
                        let n = data.len() as u64;
                        flow.down_send_started();
                        let r = user_tx.data_bytes(data).await;
                        flow.down_send_finished();
                        if r.is_err() {
                            break;
                        }
                        side.bytes(0, n);
                    }
                    ChannelMsg::ExtendedData { data, ext } => {
                        let n = data.len() as u64;
                        flow.down_send_started();
                        let r = user_tx.extended_data_bytes(ext, data).await;
                        flow.down_send_finished();
                        if r.is_err() {
                            break;
                        }
                        side.bytes(0, n);
                    }
                    // On a session channel the VM's EOF is held back until its exit status (or
                    // close) arrives: a client that has seen EOF both ways may close the channel
                    // at once (OpenSSH's ControlMaster does), russh answers that close
                    // immediately, and an exit status arriving later would be lost. sshd itself
                    // keeps the channel until the command has exited.
                    ChannelMsg::Eof
                        if session_channel && exit_status.is_none() && exit_signal.is_none() =>
                    {
                        held_eof = true;
                    }
                    ChannelMsg::Eof => {
                        let _ = user_tx.eof().await;
                    }
                    ChannelMsg::Success => Box::pin(side.reply(user_id, true)).await,
                    ChannelMsg::Failure => Box::pin(side.reply(user_id, false)).await,
                    ChannelMsg::ExitStatus { exit_status: s } => {
                        exit_status = Some(s);
                        Box::pin(side.exit_status(user_id, s)).await;
                        if std::mem::take(&mut held_eof) {
                            let _ = user_tx.eof().await;
                        }
                    }
                    ChannelMsg::ExitSignal {
                        signal_name,
                        core_dumped,
                        error_message,
                        ..
                    } => {
                        exit_signal = Some(format!("{signal_name:?}"));
                        Box::pin(side.exit_signal(
                            user_id,
                            signal_name,
                            core_dumped,
                            error_message,
                        ))
                        .await;
                        if std::mem::take(&mut held_eof) {
                            let _ = user_tx.eof().await;
                        }
                    }
                    ChannelMsg::Close => {
                        vm_closed = true;
                        break;
                    }
                    _ => {}
                }
            }
            if !vm_closed && session_channel && exit_status.is_none() && exit_signal.is_none() {
                // The VM went away mid-session: say so on stderr rather than just closing.
                let message = format!("\r\n{}\r\n", side.vm_lost_message());
                let _ = user_tx
                    .extended_data_bytes(1, Bytes::from(message.into_bytes()))
                    .await;
            }
            if held_eof {
                let _ = user_tx.eof().await;
            }
            if session_channel {
                side.exited(exit_status, exit_signal);
            }
            let _ = user_tx.close().await;
        }
    };

    // The up side ends when the user closes; the down side when the VM closes. Either closing
    // closes the other half.
    let mut up = std::pin::pin!(async {
        tokio::join!(reader(), writer());
    });
    let mut down = std::pin::pin!(down());
    let user_closed = tokio::select! {
        () = &mut up => true,
        () = &mut down => false,
    };
    let _ = vm_tx.close().await;
    if user_closed {
        // User closed: let the VM's remaining output drain briefly.
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut down).await;
    }
}

/// Waits until the up reader may take another packet from the user.
async fn admit(flow: &FlowControl, buffered: &AtomicUsize, drained: &Notify, congested: &mut bool) {
    loop {
        let notified = drained.notified();
        let woken_by_down = flow.notify.notified();
        tokio::pin!(notified);
        tokio::pin!(woken_by_down);
        notified.as_mut().enable();
        woken_by_down.as_mut().enable();

        let level = buffered.load(Ordering::Acquire);
        let over = level >= HIGH_WATER;
        if over != *congested {
            *congested = over;
            if over {
                flow.congested.fetch_add(1, Ordering::AcqRel);
            } else {
                flow.congested.fetch_sub(1, Ordering::AcqRel);
            }
        }
        if !over {
            return;
        }
        if flow.down_busy() {
            if level < HARD_LIMIT {
                return;
            }
            // Keep the user-side loop turning, slowly, so window adjustments get through.
            tokio::time::sleep(PACE).await;
            return;
        }
        tokio::select! {
            () = &mut notified => {}
            () = &mut woken_by_down => {}
        }
    }
}

enum Forward {
    Sent,
    Refused,
    Closed,
}

async fn forward_up<C>(
    vm: &ChannelWriteHalf<C>,
    item: Up,
    session_channel: bool,
    allow_agent: bool,
) -> Forward
where
    C: From<(russh::ChannelId, ChannelMsg)> + Send + Sync + 'static,
{
    let result = match item {
        Up::Data(data) => vm.data_bytes(data).await,
        Up::Ext(ext, data) => vm.extended_data_bytes(ext, data).await,
        Up::Eof => vm.eof().await,
        Up::Close => {
            let _ = vm.close().await;
            return Forward::Closed;
        }
        _ if !session_channel => return Forward::Refused,
        Up::Pty {
            term,
            cols,
            rows,
            px_w,
            px_h,
            modes,
        } => {
            vm.request_pty(true, &term, cols, rows, px_w, px_h, &modes)
                .await
        }
        Up::Env(name, value) => vm.set_env(false, name, value).await,
        Up::Shell => vm.request_shell(true).await,
        Up::Exec(command) => vm.exec(true, command).await,
        Up::Subsystem(name) => vm.request_subsystem(true, name).await,
        Up::WindowChange(c, r, w, h) => vm.window_change(c, r, w, h).await,
        Up::Signal(sig) => vm.signal(sig).await,
        Up::Agent if allow_agent => vm.agent_forward(false).await,
        Up::Agent | Up::X11 => return Forward::Refused,
    };
    sent(result)
}

fn sent(result: Result<(), russh::Error>) -> Forward {
    match result {
        Ok(()) => Forward::Sent,
        Err(_) => Forward::Closed,
    }
}
