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

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use russh::{Channel, ChannelMsg, ChannelReadHalf, ChannelWriteHalf, Sig};
use tokio::sync::Notify;

/// The variable that names the VM in each session's environment, set by the gateway as it
/// opens the VM's channel. The user's own value for it (`SendEnv`) is not relayed: the
/// gateway's is the true one.
pub(crate) const VM_ENV: &str = "POOLGATE_VM";

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

    /// A down pump inside a send to the user, until the returned guard drops.
    fn down_send(&self) -> DownSend<'_> {
        self.sending_down.fetch_add(1, Ordering::AcqRel);
        self.notify.notify_waiters();
        DownSend(self)
    }

    fn down_busy(&self) -> bool {
        self.sending_down.load(Ordering::Acquire) > 0
    }
}

/// A down send in progress ([`FlowControl::down_send`]); counted until dropped, so a pump
/// dropped in the middle of a send (its channel closed from the other side) is no longer counted.
struct DownSend<'a>(&'a FlowControl);

impl Drop for DownSend<'_> {
    fn drop(&mut self) {
        self.0.sending_down.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One channel's share of [`FlowControl`]'s congestion count, given back when dropped. The up
/// reader's future is dropped, not finished, when the VM closes the channel first: a share
/// left behind would hold the whole connection's window at [`TRICKLE_WINDOW`] for good, every
/// other channel crawling at two bytes per round trip.
struct CongestionShare<'a> {
    flow: &'a FlowControl,
    held: bool,
}

impl<'a> CongestionShare<'a> {
    fn new(flow: &'a FlowControl) -> Self {
        Self { flow, held: false }
    }

    /// Holds the share while `over`, gives it back otherwise.
    fn set(&mut self, over: bool) {
        if over == self.held {
            return;
        }
        self.held = over;
        if over {
            self.flow.congested.fetch_add(1, Ordering::AcqRel);
        } else {
            self.flow.congested.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Drop for CongestionShare<'_> {
    fn drop(&mut self) {
        self.set(false);
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
    /// The command an exec request runs on the VM (the gateway's `pool` verbs rewrite theirs);
    /// by default the user's, unchanged.
    fn exec_command(&self, command: Vec<u8>) -> Vec<u8> {
        command
    }
}

/// What the up pump forwards to the VM, in order.
enum Up {
    Data(Bytes),
    Ext(u32, Bytes),
    Eof,
    /// A request the VM may get, by [`Relay::forward_up`]'s rules.
    Request(Request),
    /// An X11 request: never forwarded, refused in its place in the stream.
    X11,
    Close,
}

/// The up reader's queue to the up writer, in order. A list under a lock rather than a channel:
/// a tokio channel allocates a block of 32 slots (2 KiB) when it is made, and most channels of
/// idle sessions never queue anything after their first request. The list allocates on first
/// use, and gives back what a burst grew it to once it is empty again. Its bytes are counted in
/// [`Relay::buffered`], which bounds it.
#[derive(Default)]
struct UpQueue {
    items: Mutex<VecDeque<Up>>,
    /// Woken when an item is pushed or the reader is done.
    pushed: Notify,
    /// The reader pushes nothing more.
    reader_done: AtomicBool,
    /// The writer takes nothing more: pushing is pointless.
    writer_done: AtomicBool,
}

/// Items an empty [`UpQueue`] keeps room for; a burst's growth beyond is given back.
const UP_QUEUE_KEPT: usize = 16;

impl UpQueue {
    fn items(&self) -> std::sync::MutexGuard<'_, VecDeque<Up>> {
        // Items are only pushed and popped whole: a panic cannot leave the list half changed.
        self.items.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `item`; `false` once the writer has stopped.
    fn push(&self, item: Up) -> bool {
        if self.writer_done.load(Ordering::Acquire) {
            return false;
        }
        self.items().push_back(item);
        self.pushed.notify_one();
        true
    }

    /// The next item; `None` once the reader is done and everything it queued was taken.
    async fn pop(&self) -> Option<Up> {
        loop {
            {
                let mut items = self.items();
                if let Some(item) = items.pop_front() {
                    if items.is_empty() && items.capacity() > UP_QUEUE_KEPT {
                        items.shrink_to(UP_QUEUE_KEPT);
                    }
                    return Some(item);
                }
            }
            if self.reader_done.load(Ordering::Acquire) {
                // Pushed before the flag was set, so seen by a last look.
                return self.items().pop_front();
            }
            // `notify_one` stores a wake-up when nobody waits: one pushed between the look
            // above and this wait is not missed.
            self.pushed.notified().await;
        }
    }

    fn reader_finished(&self) {
        self.reader_done.store(true, Ordering::Release);
        self.pushed.notify_one();
    }

    /// What is still queued is dropped: nothing will write it.
    fn writer_finished(&self) {
        self.writer_done.store(true, Ordering::Release);
        *self.items() = VecDeque::new();
    }
}

/// The user's channel requests that can go on to the VM.
enum Request {
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
}

impl Up {
    /// What the up pump forwards for a message from the user (`None`: nothing).
    fn from_user(msg: ChannelMsg) -> Option<Self> {
        let request = match msg {
            ChannelMsg::Data { data } => return Some(Up::Data(data)),
            ChannelMsg::ExtendedData { data, ext } => return Some(Up::Ext(ext, data)),
            ChannelMsg::Eof => return Some(Up::Eof),
            ChannelMsg::Close => return Some(Up::Close),
            ChannelMsg::RequestX11 { .. } => return Some(Up::X11),
            ChannelMsg::RequestPty {
                term,
                col_width,
                row_height,
                pix_width,
                pix_height,
                terminal_modes,
                ..
            } => Request::Pty {
                term,
                cols: col_width,
                rows: row_height,
                px_w: pix_width,
                px_h: pix_height,
                modes: terminal_modes,
            },
            // The gateway sets the VM's name itself (`Link::open_session`).
            ChannelMsg::SetEnv { variable_name, .. } if variable_name == VM_ENV => return None,
            ChannelMsg::SetEnv {
                variable_name,
                variable_value,
                ..
            } => Request::Env(variable_name, variable_value),
            ChannelMsg::RequestShell { .. } => Request::Shell,
            ChannelMsg::Exec { command, .. } => Request::Exec(command),
            ChannelMsg::RequestSubsystem { name, .. } => Request::Subsystem(name),
            ChannelMsg::WindowChange {
                col_width,
                row_height,
                pix_width,
                pix_height,
            } => Request::WindowChange(col_width, row_height, pix_width, pix_height),
            ChannelMsg::Signal { signal } => Request::Signal(signal),
            ChannelMsg::AgentForward { .. } => Request::Agent,
            _ => return None,
        };
        Some(Up::Request(request))
    }

    /// Bytes this item holds in the up buffer.
    fn bytes(&self) -> usize {
        match self {
            Up::Data(b) | Up::Ext(_, b) => b.len(),
            _ => 0,
        }
    }

    /// Whether the user expects a reply (OpenSSH: pty-req, shell, exec, subsystem; env,
    /// window-change and signal never; the agent request is answered by russh itself).
    fn wants_reply(&self) -> bool {
        matches!(
            self,
            Up::X11
                | Up::Request(
                    Request::Pty { .. } | Request::Shell | Request::Exec(_) | Request::Subsystem(_)
                )
        )
    }
}

/// The reading half of one side of a channel: russh's [`ChannelReadHalf`], a queue in tests.
trait Source: Send {
    /// The next message; `None` once the channel or its connection is gone.
    fn next(&mut self) -> impl Future<Output = Option<ChannelMsg>> + Send;
}

/// The writing half of one side of a channel: russh's [`ChannelWriteHalf`], a fake in tests.
/// Each call waits for the peer's window, as russh's do.
trait Sink: Sync {
    fn data(&self, data: Bytes) -> impl Future<Output = Result<(), russh::Error>> + Send;
    fn extended_data(
        &self,
        ext: u32,
        data: Bytes,
    ) -> impl Future<Output = Result<(), russh::Error>> + Send;
    fn eof(&self) -> impl Future<Output = Result<(), russh::Error>> + Send;
    fn close(&self) -> impl Future<Output = Result<(), russh::Error>> + Send;
}

/// The VM's side also takes the user's requests.
trait VmSink: Sink {
    fn request(&self, request: Request) -> impl Future<Output = Result<(), russh::Error>> + Send;
}

impl Source for ChannelReadHalf {
    fn next(&mut self) -> impl Future<Output = Option<ChannelMsg>> + Send {
        self.wait()
    }
}

impl<S> Sink for ChannelWriteHalf<S>
where
    S: From<(russh::ChannelId, ChannelMsg)> + Send + Sync + 'static,
{
    fn data(&self, data: Bytes) -> impl Future<Output = Result<(), russh::Error>> + Send {
        self.data_bytes(data)
    }

    fn extended_data(
        &self,
        ext: u32,
        data: Bytes,
    ) -> impl Future<Output = Result<(), russh::Error>> + Send {
        self.extended_data_bytes(ext, data)
    }

    fn eof(&self) -> impl Future<Output = Result<(), russh::Error>> + Send {
        ChannelWriteHalf::eof(self)
    }

    fn close(&self) -> impl Future<Output = Result<(), russh::Error>> + Send {
        ChannelWriteHalf::close(self)
    }
}

impl<S> VmSink for ChannelWriteHalf<S>
where
    S: From<(russh::ChannelId, ChannelMsg)> + Send + Sync + 'static,
{
    async fn request(&self, request: Request) -> Result<(), russh::Error> {
        match request {
            Request::Pty {
                term,
                cols,
                rows,
                px_w,
                px_h,
                modes,
            } => {
                self.request_pty(true, &term, cols, rows, px_w, px_h, &modes)
                    .await
            }
            Request::Env(name, value) => self.set_env(false, name, value).await,
            Request::Shell => self.request_shell(true).await,
            Request::Exec(command) => self.exec(true, command).await,
            Request::Subsystem(name) => self.request_subsystem(true, name).await,
            Request::WindowChange(c, r, w, h) => self.window_change(c, r, w, h).await,
            Request::Signal(sig) => self.signal(sig).await,
            Request::Agent => self.agent_forward(false).await,
        }
    }
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
    let relay = Relay::new(flow, side, user.id(), session_channel, allow_agent);
    let (user_rx, user_tx) = user.split();
    let (vm_rx, vm_tx) = vm.split();
    relay.run(user_rx, &user_tx, vm_rx, &vm_tx).await;
}

/// One channel's relay: what its three pumps share.
struct Relay<U> {
    flow: Arc<FlowControl>,
    side: Arc<U>,
    /// The user's end of the channel, for replies and exit status.
    user_channel: russh::ChannelId,
    /// A session channel (shell, exec, subsystem), which alone forwards requests and reports an
    /// exit; forwardings only carry bytes.
    session_channel: bool,
    allow_agent: bool,
    /// What the up reader took from the user, on its way to the up writer.
    queue: UpQueue,
    /// Bytes taken from the user and not yet written to the VM.
    buffered: AtomicUsize,
    /// Woken each time the up writer takes bytes out of the buffer.
    drained: Notify,
}

impl<U: UserSide> Relay<U> {
    fn new(
        flow: Arc<FlowControl>,
        side: Arc<U>,
        user_channel: russh::ChannelId,
        session_channel: bool,
        allow_agent: bool,
    ) -> Self {
        Self {
            flow,
            side,
            user_channel,
            session_channel,
            allow_agent,
            queue: UpQueue::default(),
            buffered: AtomicUsize::new(0),
            drained: Notify::new(),
        }
    }

    /// Runs the three pumps until the channel is done. The up side (reader and writer) ends when
    /// the user closes, the down side when the VM closes; either closing closes the other half.
    async fn run(
        &self,
        user_rx: impl Source,
        user_tx: &impl Sink,
        vm_rx: impl Source,
        vm_tx: &impl VmSink,
    ) {
        // The pumps' futures are made where they are awaited, so each state machine exists once
        // inside this one, not also as a moved-from local.
        let mut up = std::pin::pin!(async {
            tokio::join!(self.up_reader(user_rx), self.up_writer(vm_tx));
        });
        let mut down = std::pin::pin!(self.down_pump(vm_rx, user_tx));
        let user_closed = tokio::select! {
            () = &mut up => true,
            () = &mut down => false,
        };
        // Boxed: the close's state (a russh message on its way, about 1.4 KiB) would otherwise
        // be room this future keeps, next to both pumps, for the life of the channel.
        let _ = Box::pin(vm_tx.close()).await;
        if user_closed {
            // User closed: let the VM's remaining output drain briefly.
            let _ = tokio::time::timeout(Duration::from_secs(5), &mut down).await;
        }
    }

    /// Up reader: user channel -> byte-counted queue, admitting packets by [`Self::admit`].
    async fn up_reader(&self, mut user: impl Source) {
        let mut congested = CongestionShare::new(&self.flow);
        loop {
            self.admit(&mut congested).await;
            let Some(msg) = user.next().await else {
                let _ = self.queue.push(Up::Close);
                break;
            };
            let Some(item) = Up::from_user(msg) else {
                continue;
            };
            let closing = matches!(item, Up::Close);
            self.buffered.fetch_add(item.bytes(), Ordering::AcqRel);
            if !self.queue.push(item) || closing {
                break;
            }
        }
        self.queue.reader_finished();
    }

    /// Waits until the up reader may take another packet from the user (the rule in the module
    /// documentation), keeping this channel's share of [`FlowControl`]'s congestion count.
    async fn admit(&self, congested: &mut CongestionShare<'_>) {
        loop {
            let notified = self.drained.notified();
            let woken_by_down = self.flow.notify.notified();
            tokio::pin!(notified);
            tokio::pin!(woken_by_down);
            notified.as_mut().enable();
            woken_by_down.as_mut().enable();

            let level = self.buffered.load(Ordering::Acquire);
            let over = level >= HIGH_WATER;
            congested.set(over);
            if !over {
                return;
            }
            if self.flow.down_busy() {
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

    /// Up writer: queue -> VM channel, in order; waits for the VM's window.
    async fn up_writer(&self, vm: &impl VmSink) {
        while let Some(item) = self.queue.pop().await {
            let n = item.bytes();
            let reply_expected = item.wants_reply();
            let ok = match item {
                // The hot path stays inline; the rest (rare, with large futures) is boxed so the
                // writer's state stays small for the life of the channel.
                Up::Data(data) => sent(vm.data(data).await),
                Up::Ext(ext, data) => sent(vm.extended_data(ext, data).await),
                item => Box::pin(self.forward_up(vm, item)).await,
            };
            if n > 0 {
                self.buffered.fetch_sub(n, Ordering::AcqRel);
                self.drained.notify_one();
                self.side.bytes(n as u64, 0);
            }
            match ok {
                Forward::Sent => {}
                Forward::Refused if reply_expected => {
                    // Not sent to the VM: answer the user ourselves.
                    Box::pin(self.side.reply(self.user_channel, false)).await;
                }
                Forward::Refused => {}
                Forward::Closed => break,
            }
        }
        self.queue.writer_finished();
    }

    /// Everything but the hot path on its way to the VM. Only session channels forward requests
    /// (the agent only where allowed, X11 never).
    async fn forward_up(&self, vm: &impl VmSink, item: Up) -> Forward {
        let request = match item {
            Up::Data(data) => return sent(vm.data(data).await),
            Up::Ext(ext, data) => return sent(vm.extended_data(ext, data).await),
            Up::Eof => return sent(vm.eof().await),
            Up::Close => {
                let _ = vm.close().await;
                return Forward::Closed;
            }
            Up::X11 => return Forward::Refused,
            Up::Request(request) => request,
        };
        match request {
            _ if !self.session_channel => Forward::Refused,
            Request::Agent if !self.allow_agent => Forward::Refused,
            Request::Exec(command) => sent(
                vm.request(Request::Exec(self.side.exec_command(command)))
                    .await,
            ),
            request => sent(vm.request(request).await),
        }
    }

    /// Down pump: VM channel -> user, one packet at a time, then the end of the channel.
    async fn down_pump(&self, mut vm: impl Source, user: &impl Sink) {
        let mut exit_status = None;
        let mut exit_signal = None;
        let mut held_eof = false;
        // Ends with the VM's Close, or with `None` when the VM connection itself is gone.
        let mut vm_closed = false;
        while let Some(msg) = vm.next().await {
            match msg {
                // Written out twice on purpose: a helper taking the send future would hold it
                // twice in this state machine (some 700 bytes more per channel).
                ChannelMsg::Data { data } => {
                    let n = data.len() as u64;
                    let sending = self.flow.down_send();
                    let r = user.data(data).await;
                    drop(sending);
                    if r.is_err() {
                        break;
                    }
                    self.side.bytes(0, n);
                }
                ChannelMsg::ExtendedData { data, ext } => {
                    let n = data.len() as u64;
                    let sending = self.flow.down_send();
                    let r = user.extended_data(ext, data).await;
                    drop(sending);
                    if r.is_err() {
                        break;
                    }
                    self.side.bytes(0, n);
                }
                // On a session channel the VM's EOF is held back until its exit status (or
                // close) arrives: a client that has seen EOF both ways may close the channel at
                // once (OpenSSH's ControlMaster does), russh answers that close immediately, and
                // an exit status arriving later would be lost. sshd itself keeps the channel
                // until the command has exited.
                ChannelMsg::Eof
                    if self.session_channel && exit_status.is_none() && exit_signal.is_none() =>
                {
                    held_eof = true;
                }
                ChannelMsg::Eof => {
                    let _ = user.eof().await;
                }
                ChannelMsg::Success => Box::pin(self.side.reply(self.user_channel, true)).await,
                ChannelMsg::Failure => Box::pin(self.side.reply(self.user_channel, false)).await,
                ChannelMsg::ExitStatus { exit_status: s } => {
                    exit_status = Some(s);
                    Box::pin(self.side.exit_status(self.user_channel, s)).await;
                    if std::mem::take(&mut held_eof) {
                        let _ = user.eof().await;
                    }
                }
                ChannelMsg::ExitSignal {
                    signal_name,
                    core_dumped,
                    error_message,
                    ..
                } => {
                    exit_signal = Some(format!("{signal_name:?}"));
                    Box::pin(self.side.exit_signal(
                        self.user_channel,
                        signal_name,
                        core_dumped,
                        error_message,
                    ))
                    .await;
                    if std::mem::take(&mut held_eof) {
                        let _ = user.eof().await;
                    }
                }
                ChannelMsg::Close => {
                    vm_closed = true;
                    break;
                }
                _ => {}
            }
        }
        if !vm_closed && self.session_channel && exit_status.is_none() && exit_signal.is_none() {
            // The VM went away mid-session: say so on stderr rather than just closing.
            let message = format!("\r\n{}\r\n", self.side.vm_lost_message());
            let _ = user
                .extended_data(1, Bytes::from(message.into_bytes()))
                .await;
        }
        if held_eof {
            let _ = user.eof().await;
        }
        if self.session_channel {
            self.side.exited(exit_status, exit_signal);
        }
        let _ = user.close().await;
    }
}

enum Forward {
    Sent,
    Refused,
    Closed,
}

fn sent(result: Result<(), russh::Error>) -> Forward {
    match result {
        Ok(()) => Forward::Sent,
        Err(_) => Forward::Closed,
    }
}

#[cfg(test)]
mod tests;
