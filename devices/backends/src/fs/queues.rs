//! The fs backend's side of virtio: FUSE requests taken off the guest's queues and handed to
//! virtiofsd's FUSE server, with the queue watched a short while after each batch.
//!
//! virtiofsd's own vhost-user backend goes back to sleep on the guest's kick as soon as a
//! queue is empty, so a guest that sends its next request a few microseconds after the last
//! reply (`git status` stats one file after another; the kernel's FUSE sends most operations
//! one at a time) pays a kick, which is a VM exit, and a wake-up of the backend per request.
//! This backend leaves notifications off after a batch and watches the ring for up to
//! [`MAX_POLL`], yielding the CPU between looks, as QEMU's adaptive polling does; how long it
//! watches follows the gaps it sees between batches, so a guest that is idle costs nothing.
//!
//! A chain that breaks virtio (a buffer outside guest RAM, no reply buffer) gets an empty
//! reply: a hostile guest kernel only breaks its own requests.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::Backend;
use vhost_user_backend::bitmap::BitmapMmapRegion;
use vhost_user_backend::{VhostUserBackend, VringMutex, VringState, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;
use virtiofsd::descriptor_utils::{Reader, Writer};
use virtiofsd::filesystem::FileSystem;
use virtiofsd::server::Server;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier};

/// Guest RAM as virtiofsd's FUSE server takes it (with a dirty bitmap that stays unused:
/// cvm never migrates a backend).
type Memory = GuestMemoryAtomic<GuestMemoryMmap<BitmapMmapRegion>>;
type Vring = VringMutex<Memory>;

/// virtio-fs queues: high priority (FORGET, INTERRUPT), then one request queue.
const HIPRIO_QUEUE: u16 = 0;
const REQUEST_QUEUE: u16 = 1;
const NUM_QUEUES: usize = 2;
/// The largest queue the frontend may set up (virtiofsd's limit).
const MAX_QUEUE_SIZE: usize = 32768;

/// The longest the backend watches an empty request queue before it sleeps: QEMU watches its
/// queues for up to 32 µs; a little longer here, where a cross-CPU wake-up costs tens of µs
/// (a PVM host).
pub(super) const MAX_POLL: Duration = Duration::from_micros(50);
/// The shortest watch worth starting: below it the window closes to nothing.
const MIN_POLL: Duration = Duration::from_micros(4);

/// How long to watch an empty queue, learnt from the gaps between batches: a gap a watch
/// would have covered doubles the window (up to [`MAX_POLL`]), a longer one halves it.
#[derive(Debug, Default)]
pub(super) struct PollWindow {
    window: Duration,
    /// When the last batch ended.
    idle_since: Option<Instant>,
}

impl PollWindow {
    /// The queue has work again, `now`.
    fn woken(&mut self, now: Instant) {
        if let Some(since) = self.idle_since.take() {
            self.learn(now.saturating_duration_since(since));
        }
    }

    fn learn(&mut self, gap: Duration) {
        self.window = if gap <= MAX_POLL {
            (self.window * 2).clamp(MIN_POLL, MAX_POLL)
        } else if self.window / 2 < MIN_POLL {
            Duration::ZERO
        } else {
            self.window / 2
        };
    }

    /// Watches for `more` for up to the window; says whether it came. `now` is when the batch
    /// ended.
    fn watch(&mut self, now: Instant, mut more: impl FnMut() -> bool) -> bool {
        let deadline = now + self.window;
        while Instant::now() < deadline {
            if more() {
                self.learn(now.elapsed());
                return true;
            }
            // Where the guest's vCPU shares this CPU, it is the one that must run.
            std::thread::yield_now();
        }
        self.idle_since = Some(now);
        false
    }
}

/// The vhost-user device: virtiofsd's FUSE server over `F`, and the queue handling above.
pub(super) struct FsQueues<F: FileSystem + Sync> {
    server: Server<F>,
    memory: RwLock<Option<Memory>>,
    event_idx: AtomicBool,
    poll: Mutex<PollWindow>,
    told_of_bad_request: AtomicBool,
}

impl<F: FileSystem + Sync> FsQueues<F> {
    pub(super) fn new(fs: F) -> Self {
        FsQueues {
            server: Server::new(fs),
            memory: RwLock::new(None),
            event_idx: AtomicBool::new(false),
            poll: Mutex::new(PollWindow::default()),
            told_of_bad_request: AtomicBool::new(false),
        }
    }

    /// Answers every request on the queue; says whether there was any.
    fn answer_all(&self, queue: &mut VringState<Memory>, memory: &Memory, event_idx: bool) -> io::Result<bool> {
        let mem = memory.memory();
        let mut any = false;
        while let Some(chain) = queue.get_queue_mut().pop_descriptor_chain(mem.clone()) {
            any = true;
            let head = chain.head_index();
            let written = match (Reader::new(&mem, chain.clone()), Writer::new(&mem, chain)) {
                (Ok(request), Ok(reply)) => self.server.handle_message(request, reply, None::<&mut Backend>).map_err(|e| e.to_string()),
                (Err(e), _) | (_, Err(e)) => Err(format!("the chain breaks virtio: {e}")),
            };
            let written = written.unwrap_or_else(|e| {
                // Once: a guest that sends nothing else must not fill the host's log.
                if !self.told_of_bad_request.swap(true, Ordering::Relaxed) {
                    tracing::warn!("fs: a request got an empty reply ({e}); later ones are not logged");
                }
                0
            });
            queue.add_used(head, u32::try_from(written).unwrap_or(0)).map_err(|e| io::Error::other(format!("used ring: {e:?}")))?;
            if !event_idx || queue.needs_notification().map_err(|e| io::Error::other(format!("used ring: {e:?}")))? {
                queue.signal_used_queue()?;
            }
        }
        Ok(any)
    }
}

impl<F: FileSystem + Send + Sync + 'static> VhostUserBackend for FsQueues<F> {
    type Bitmap = BitmapMmapRegion;
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        // No tag (the frontend gives the guest the config space), no DAX window, no migration.
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::RESET_DEVICE
    }

    fn reset_device(&self) {
        self.server.destroy();
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn update_memory(&self, memory: Memory) -> io::Result<()> {
        *self.memory.write().unwrap_or_else(|e| e.into_inner()) = Some(memory);
        Ok(())
    }

    fn handle_event(&self, device_event: u16, evset: EventSet, vrings: &[Vring], _thread: usize) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(io::Error::other(format!("fs: unexpected event {evset:?}")));
        }
        let polls = match device_event {
            HIPRIO_QUEUE => false,
            REQUEST_QUEUE => true,
            _ => return Err(io::Error::other(format!("fs: event on unknown queue {device_event}"))),
        };
        let memory =
            self.memory.read().unwrap_or_else(|e| e.into_inner()).clone().ok_or_else(|| io::Error::other("fs: no guest memory"))?;
        let event_idx = self.event_idx.load(Ordering::Relaxed);
        let mut queue = vrings[usize::from(device_event)].get_mut();
        let mut poll = self.poll.lock().unwrap_or_else(|e| e.into_inner());
        if polls {
            poll.woken(Instant::now());
        }
        let queue_error = |e| io::Error::other(format!("fs: queue: {e:?}"));
        loop {
            // Off while answering (and watching): a guest posting meanwhile need not kick.
            queue.disable_notification().map_err(queue_error)?;
            if !self.answer_all(&mut queue, &memory, event_idx)? {
                // Nothing came (a stray kick, or an available index that points past the
                // ring): sleep until the next kick.
                queue.enable_notification().map_err(queue_error)?;
                return Ok(());
            }
            let watched = polls && {
                let mem = memory.memory();
                let seen = queue.get_queue().avail_idx(&*mem, Ordering::Acquire).ok();
                poll.watch(Instant::now(), || queue.get_queue().avail_idx(&*mem, Ordering::Acquire).ok() != seen)
            };
            if !watched && !queue.enable_notification().map_err(queue_error)? {
                return Ok(());
            }
        }
    }

    fn exit_event(&self, _thread: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_idle_queue_is_not_watched_until_short_gaps_are_seen() {
        let mut poll = PollWindow::default();
        let mut looked = 0;
        assert!(
            !poll.watch(Instant::now(), || {
                looked += 1;
                true
            }),
            "a new queue sleeps at once"
        );
        assert_eq!(looked, 0);
        // Work came soon after: the window opens, then doubles up to its cap.
        let start = Instant::now();
        poll.woken(start);
        assert_eq!(poll.window, MIN_POLL);
        for _ in 0..16 {
            poll.learn(Duration::from_micros(1));
        }
        assert_eq!(poll.window, MAX_POLL);
        // Gaps longer than any watch close it again.
        for _ in 0..16 {
            poll.learn(MAX_POLL * 3);
        }
        assert_eq!(poll.window, Duration::ZERO);
    }

    #[test]
    fn a_watch_ends_when_work_comes_or_when_the_window_closes() {
        // A window far longer than any test machine's pause, so that the looks come in it
        // (how it then resizes depends on how long they took: `learn` is tested above).
        let mut poll = PollWindow { window: Duration::from_secs(60), idle_since: None };
        let mut looks = 0;
        assert!(poll.watch(Instant::now(), || {
            looks += 1;
            looks == 3
        }));
        assert_eq!(looks, 3, "it stops looking once work came");
        assert!(poll.idle_since.is_none(), "no idle gap began");
        poll.window = MAX_POLL;
        let started = Instant::now();
        assert!(!poll.watch(started, || false));
        assert!(started.elapsed() >= MAX_POLL, "it watched for its whole window");
        assert_eq!(poll.idle_since, Some(started), "and counts the gap from the batch's end");
    }
}
