//! The admission rules of the up reader, on a paused clock, through [`Relay::run`] with fake
//! channel halves: the test plays the user and the VM and opens their windows packet by packet.

use russh::keys::ssh_encoding::Decode;
use tokio::sync::{Semaphore, mpsc};

use super::*;

/// Size of one data packet from the user (HIGH_WATER and HARD_LIMIT are multiples of it).
const PACKET: usize = 64 << 10;

/// One side's messages to the gateway, as a queue the test fills; counts what the relay took.
struct Queue {
    rx: mpsc::UnboundedReceiver<ChannelMsg>,
    taken: Arc<AtomicUsize>,
}

impl Source for Queue {
    async fn next(&mut self) -> Option<ChannelMsg> {
        let msg = self.rx.recv().await;
        if msg.is_some() {
            self.taken.fetch_add(1, Ordering::AcqRel);
        }
        msg
    }
}

/// One side's receiving end: takes a data packet per permit (its window), none until the test
/// grants some.
struct Window(Arc<Semaphore>);

impl Window {
    async fn take(&self) -> Result<(), russh::Error> {
        let permit = self
            .0
            .acquire()
            .await
            .map_err(|_| russh::Error::SendError)?;
        permit.forget();
        Ok(())
    }
}

impl Sink for Window {
    async fn data(&self, _: Bytes) -> Result<(), russh::Error> {
        self.take().await
    }

    async fn extended_data(&self, _: u32, _: Bytes) -> Result<(), russh::Error> {
        self.take().await
    }

    async fn eof(&self) -> Result<(), russh::Error> {
        Ok(())
    }

    async fn close(&self) -> Result<(), russh::Error> {
        Ok(())
    }
}

impl VmSink for Window {
    async fn request(&self, _: Request) -> Result<(), russh::Error> {
        Ok(())
    }
}

/// A user connection that takes replies and counts nothing.
struct Quiet;

impl UserSide for Quiet {
    async fn reply(&self, _: russh::ChannelId, _: bool) {}
    async fn exit_status(&self, _: russh::ChannelId, _: u32) {}
    async fn exit_signal(&self, _: russh::ChannelId, _: Sig, _: bool, _: String) {}
    fn bytes(&self, _: u64, _: u64) {}
    fn exited(&self, _: Option<u32>, _: Option<String>) {}
    fn vm_lost_message(&self) -> String {
        String::new()
    }
}

/// A relay running on fake halves, with the test's handles on both sides.
struct Harness {
    relay: Arc<Relay<Quiet>>,
    /// The user's packets towards the VM.
    user: mpsc::UnboundedSender<ChannelMsg>,
    /// Packets the up reader has taken from the user.
    admitted: Arc<AtomicUsize>,
    /// The VM's window: packets the up writer may still send.
    vm_window: Arc<Semaphore>,
    /// The VM's packets towards the user.
    vm: mpsc::UnboundedSender<ChannelMsg>,
    /// The user's window: packets the down pump may still send.
    user_window: Arc<Semaphore>,
}

impl Harness {
    /// A session channel with both windows closed.
    fn start() -> Self {
        // russh makes channel ids only from the wire.
        let id = russh::ChannelId::decode(&mut &[0u8, 0, 0, 1][..]).expect("a channel id");
        let flow = Arc::new(FlowControl::default());
        let relay = Arc::new(Relay::new(flow, Arc::new(Quiet), id, true, false));
        let (user, user_rx) = mpsc::unbounded_channel();
        let (vm, vm_rx) = mpsc::unbounded_channel();
        let admitted = Arc::new(AtomicUsize::new(0));
        let vm_window = Arc::new(Semaphore::new(0));
        let user_window = Arc::new(Semaphore::new(0));
        let user_rx = Queue {
            rx: user_rx,
            taken: admitted.clone(),
        };
        let vm_rx = Queue {
            rx: vm_rx,
            taken: Arc::default(),
        };
        let (user_tx, vm_tx) = (Window(user_window.clone()), Window(vm_window.clone()));
        let running = relay.clone();
        tokio::spawn(async move { running.run(user_rx, &user_tx, vm_rx, &vm_tx).await });
        Self {
            relay,
            user,
            admitted,
            vm_window,
            vm,
            user_window,
        }
    }

    fn user_sends(&self, packets: usize) {
        for _ in 0..packets {
            let data = Bytes::from(vec![0u8; PACKET]);
            self.user
                .send(ChannelMsg::Data { data })
                .expect("the relay reads");
        }
    }

    /// The VM sends a packet, which the down pump keeps sending while the user's window is
    /// closed.
    fn vm_sends_one(&self) {
        let data = Bytes::from_static(b"output");
        self.vm
            .send(ChannelMsg::Data { data })
            .expect("the relay reads");
    }

    fn admitted(&self) -> usize {
        self.admitted.load(Ordering::Acquire)
    }

    fn buffered(&self) -> usize {
        self.relay.buffered.load(Ordering::Acquire)
    }

    fn congested(&self) -> usize {
        self.relay.flow.congested.load(Ordering::Acquire)
    }
}

/// Lets every task run until it waits, without moving the clock.
async fn settle() {
    for _ in 0..64 {
        tokio::task::yield_now().await;
    }
}

const NORMAL_WINDOW: u32 = 2 << 20;

#[tokio::test(start_paused = true)]
async fn over_high_water_with_nothing_going_down_the_reader_waits_until_the_buffer_drains() {
    let h = Harness::start();
    h.user_sends(HIGH_WATER / PACKET + 4);
    settle().await;
    assert_eq!(h.admitted(), HIGH_WATER / PACKET);
    assert_eq!(h.buffered(), HIGH_WATER);

    // Time alone admits nothing.
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(h.admitted(), HIGH_WATER / PACKET);

    // The VM takes one packet: one more packet fits under the mark.
    h.vm_window.add_permits(1);
    settle().await;
    assert_eq!(h.admitted(), HIGH_WATER / PACKET + 1);
    assert_eq!(h.buffered(), HIGH_WATER);

    // The VM takes everything: the reader takes the rest.
    h.vm_window.add_permits(usize::MAX >> 4);
    settle().await;
    assert_eq!(h.admitted(), HIGH_WATER / PACKET + 4);
    assert_eq!(h.buffered(), 0);
}

#[tokio::test(start_paused = true)]
async fn over_high_water_the_reader_admits_up_to_the_hard_limit_while_a_down_send_waits() {
    let h = Harness::start();
    h.user_sends(HARD_LIMIT / PACKET + 4);
    settle().await;
    assert_eq!(h.admitted(), HIGH_WATER / PACKET);

    // A down send stuck on the user's window wakes the waiting reader: the user-side loop
    // must keep turning, as the user's window adjustment may sit behind the user's data.
    h.vm_sends_one();
    settle().await;
    assert_eq!(h.admitted(), HARD_LIMIT / PACKET);
    assert_eq!(h.buffered(), HARD_LIMIT);

    // Once the down send is through, the reader waits for the buffer again.
    h.user_window.add_permits(1);
    settle().await;
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(h.admitted(), HARD_LIMIT / PACKET + 1);
}

#[tokio::test(start_paused = true)]
async fn at_the_hard_limit_the_reader_admits_one_packet_per_pace() {
    let h = Harness::start();
    h.vm_sends_one();
    h.user_sends(HARD_LIMIT / PACKET + 20);
    settle().await;
    assert_eq!(h.admitted(), HARD_LIMIT / PACKET);
    assert_eq!(h.buffered(), HARD_LIMIT);

    // Past the limit: one packet per PACE, however much the user has sent.
    tokio::time::sleep(PACE * 10 + PACE / 2).await;
    assert_eq!(h.admitted(), HARD_LIMIT / PACKET + 10);
    tokio::time::sleep(PACE).await;
    assert_eq!(h.admitted(), HARD_LIMIT / PACKET + 11);
}

#[tokio::test(start_paused = true)]
async fn the_congested_count_returns_to_zero_once_the_buffer_drains() {
    let h = Harness::start();
    h.user_sends(HIGH_WATER / PACKET + 4);
    settle().await;
    assert_eq!(h.congested(), 1);
    assert_eq!(
        h.relay.flow.target_window(NORMAL_WINDOW),
        TRICKLE_WINDOW,
        "the user's window shrinks while congested"
    );

    h.vm_window.add_permits(usize::MAX >> 4);
    settle().await;
    assert_eq!(h.buffered(), 0);
    assert_eq!(h.congested(), 0);
    assert_eq!(h.relay.flow.target_window(NORMAL_WINDOW), NORMAL_WINDOW);
}

#[tokio::test(start_paused = true)]
async fn a_channel_the_user_closes_while_congested_leaves_no_congestion_behind() {
    let h = Harness::start();
    h.vm_sends_one();
    h.user_sends(HIGH_WATER / PACKET + 4);
    settle().await;
    assert_eq!(h.congested(), 1);

    // The user closes; the VM has not taken the buffer yet.
    h.user.send(ChannelMsg::Close).expect("the relay reads");
    settle().await;
    assert!(h.buffered() >= HIGH_WATER);
    assert_eq!(h.congested(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_channel_the_vm_closes_while_congested_leaves_no_congestion_behind() {
    // A command that never reads its stdin while the user sends plenty (`ssh host 'sleep 10' <
    // big.file`), then ends: the VM closes the channel with the buffer still full. Before, the
    // reader's share of the congestion count was left behind, and every other channel of the
    // connection crawled at the trickle window for good.
    let h = Harness::start();
    h.user_sends(HIGH_WATER / PACKET + 4);
    settle().await;
    assert_eq!(h.congested(), 1);

    h.vm.send(ChannelMsg::Close).expect("the relay reads");
    settle().await;
    assert_eq!(h.congested(), 0);
    assert_eq!(h.relay.flow.target_window(NORMAL_WINDOW), NORMAL_WINDOW);
}

#[tokio::test(start_paused = true)]
async fn a_down_send_cut_short_by_the_channels_end_is_not_counted_on() {
    // The VM's output waits for the user's window when the user closes the channel: after the
    // drain's 5 s the down pump is dropped mid-send, and no longer counts as sending (which
    // would let every congested channel of the connection read up to the hard limit).
    let h = Harness::start();
    h.vm_sends_one();
    settle().await;
    assert!(h.relay.flow.down_busy());
    h.user.send(ChannelMsg::Close).expect("the relay reads");
    tokio::time::sleep(Duration::from_secs(6)).await;
    settle().await;
    assert!(!h.relay.flow.down_busy());
}

fn data(n: u8) -> Up {
    Up::Data(Bytes::from(vec![n]))
}

fn first_byte(item: Option<Up>) -> Option<u8> {
    match item {
        Some(Up::Data(b)) => b.first().copied(),
        _ => None,
    }
}

#[tokio::test]
async fn the_up_queue_keeps_order_and_ends_after_the_readers_last_item() {
    let queue = UpQueue::default();
    assert_eq!(queue.items().capacity(), 0, "nothing allocated before use");
    for n in 0..3 {
        assert!(queue.push(data(n)));
    }
    queue.reader_finished();
    for n in 0..3 {
        assert_eq!(first_byte(queue.pop().await), Some(n));
    }
    assert!(queue.pop().await.is_none(), "the reader is done");
}

#[tokio::test]
async fn the_up_writer_wakes_for_an_item_pushed_while_it_waits() {
    let queue = Arc::new(UpQueue::default());
    let writer = tokio::spawn({
        let queue = queue.clone();
        async move { first_byte(queue.pop().await) }
    });
    // Let the writer find the queue empty and wait.
    tokio::task::yield_now().await;
    assert!(queue.push(data(7)));
    assert_eq!(writer.await.expect("the writer ran"), Some(7));
}

#[tokio::test]
async fn a_finished_writer_refuses_more_and_drops_what_was_queued() {
    let queue = UpQueue::default();
    assert!(queue.push(data(1)));
    queue.writer_finished();
    assert!(!queue.push(data(2)), "nothing writes it any more");
    assert!(queue.items().is_empty());
}

#[tokio::test]
async fn an_emptied_up_queue_gives_back_what_a_burst_grew_it_to() {
    let queue = UpQueue::default();
    for n in 0..200 {
        assert!(queue.push(data(n)));
    }
    assert!(queue.items().capacity() >= 200);
    for _ in 0..200 {
        assert!(queue.pop().await.is_some());
    }
    assert!(queue.items().capacity() <= UP_QUEUE_KEPT);
}
