//! A room's feed: the room messages this node received for one room, kept once for all of the
//! room's local subscribers, each of which reads them from its own position.
//!
//! Fanning a message out is one append and one wake-up per subscriber: nothing is pushed into
//! each subscriber's queue, so no per-subscriber lock or copy moves between the core that fans
//! out and the cores that write. An entry is dropped once every reader has read it. A reader
//! that falls more than `max_lag` bytes behind (in its own codec) is detached and its session
//! closed with 1013, as a full outbound queue is: the session notices when it next reads, and
//! the feed finds readers that stopped reading by a scan that runs at most once per quarter of
//! `max_lag` appended, so a feed holds at most about 1.25 × `max_lag` beyond its readers.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use parking_lot::Mutex;
use prometheus::IntGauge;
use slab::Slab;
use switchboard_protocol::{Codec, RoomMessage};
use tokio_tungstenite::tungstenite::Message;

use crate::hub::SessionHandle;
use crate::queue::Outbound;

const CODECS: usize = Codec::ALL.len();

pub struct Feed {
    state: Mutex<FeedState>,
    /// Position after the newest entry, readable without the lock: a reader with nothing new
    /// does not take it.
    head: AtomicU64,
    /// Most bytes (in its codec) a reader may have waiting.
    max_lag: usize,
    /// Node-wide total of bytes waiting to be written (`switchboard_queue_bytes`).
    total_bytes: IntGauge,
}

struct FeedState {
    entries: VecDeque<Entry>,
    /// Position of `entries[0]`; every appended message takes the next position.
    first: u64,
    /// Bytes appended so far in each codec (where the next entry starts).
    appended: [u64; CODECS],
    readers: Slab<Reader>,
    next_reader_id: u64,
    /// Readers per codec: a message is encoded in the codecs somebody reads.
    codecs: [usize; CODECS],
    /// Bytes of every frame held, for the gauge.
    held: usize,
    /// Sum of `appended` at which the next scan for readers too far behind may run.
    scan_at: u64,
}

struct Entry {
    message: Arc<RoomMessage>,
    frames: [Option<Message>; CODECS],
    /// Where the entry starts in each codec's byte count.
    start: [u64; CODECS],
    /// Readers that have yet to read it.
    unread: usize,
    /// Node-wide delivery order (see the `hub` module).
    stamp: u64,
    queued_at: Instant,
}

struct Reader {
    id: u64,
    /// Position of the next entry to read.
    next: u64,
    codec: Codec,
    session: Arc<SessionHandle>,
}

/// One subscriber's place in a feed; dropping it detaches it.
pub struct FeedReader {
    feed: Arc<Feed>,
    key: usize,
    id: u64,
    /// The reader's `next`, as of its last read (the feed's copy is the truth).
    next: u64,
}

/// What a read found.
#[derive(Debug, PartialEq, Eq)]
pub enum Read {
    Read {
        /// Bytes (in the reader's codec) that were waiting before this read.
        backlog: usize,
        /// When the oldest entry read was appended.
        oldest: Option<Instant>,
        /// Entries stamped at or above the bound are left.
        more: bool,
    },
    /// The reader fell too far behind and was detached by the feed's scan.
    Detached,
}

/// What an append did.
pub struct Appended {
    /// Readers the entry was appended for.
    pub readers: usize,
    /// Sessions detached for being too far behind: to be closed with 1013.
    pub too_slow: Vec<Arc<SessionHandle>>,
}

impl Feed {
    pub fn new(max_lag: usize, total_bytes: IntGauge) -> Self {
        Feed {
            state: Mutex::new(FeedState {
                entries: VecDeque::new(),
                first: 0,
                appended: [0; CODECS],
                readers: Slab::new(),
                next_reader_id: 0,
                codecs: [0; CODECS],
                held: 0,
                scan_at: 0,
            }),
            head: AtomicU64::new(0),
            max_lag,
            total_bytes,
        }
    }

    /// Adds a reader for `session` that reads what is appended from now on.
    pub fn attach(self: &Arc<Self>, session: Arc<SessionHandle>) -> FeedReader {
        let mut state = self.state.lock();
        let id = state.next_reader_id;
        state.next_reader_id += 1;
        let next = state.first + state.entries.len() as u64;
        state.codecs[session.codec.index()] += 1;
        let key = state.readers.insert(Reader {
            id,
            next,
            codec: session.codec,
            session,
        });
        FeedReader {
            feed: self.clone(),
            key,
            id,
            next,
        }
    }

    /// Appends `message`, encoded by `encode` in each codec that has readers (`None`: it could
    /// not be, and those readers skip it). `stamp` is taken under the feed's lock so entries are
    /// in stamp order.
    pub fn append(
        &self,
        message: Arc<RoomMessage>,
        order: &AtomicU64,
        queued_at: Instant,
        mut encode: impl FnMut(Codec) -> Option<Message>,
    ) -> Appended {
        let mut state = self.state.lock();
        let readers = state.readers.len();
        if readers == 0 {
            return Appended {
                readers,
                too_slow: Vec::new(),
            };
        }
        let mut frames: [Option<Message>; CODECS] = Default::default();
        let start = state.appended;
        let mut bytes = 0;
        for codec in Codec::ALL {
            let index = codec.index();
            if state.codecs[index] > 0
                && let Some(frame) = encode(codec)
            {
                state.appended[index] += frame.len() as u64;
                bytes += frame.len();
                frames[index] = Some(frame);
            }
        }
        state.held += bytes;
        self.total_bytes.add(bytes as i64);
        state.entries.push_back(Entry {
            message,
            frames,
            start,
            unread: readers,
            stamp: order.fetch_add(1, Ordering::SeqCst),
            queued_at,
        });
        let head = state.first + state.entries.len() as u64;
        self.head.store(head, Ordering::Release);
        let too_slow = self.scan(&mut state);
        Appended {
            readers: state.readers.len(),
            too_slow,
        }
    }

    /// Detaches the readers more than `max_lag` behind, when the oldest entry held is that far
    /// back and the last scan was a quarter of `max_lag` ago.
    fn scan(&self, state: &mut FeedState) -> Vec<Arc<SessionHandle>> {
        let Some(front) = state.entries.front() else {
            return Vec::new();
        };
        let over = (0..CODECS).any(|index| {
            state.codecs[index] > 0
                && state.appended[index] - front.start[index] > self.max_lag as u64
        });
        let appended: u64 = state.appended.iter().sum();
        if !over || appended < state.scan_at {
            return Vec::new();
        }
        state.scan_at = appended + (self.max_lag / 4) as u64;
        let behind: Vec<usize> = state
            .readers
            .iter()
            .filter(|(_, reader)| state.lag(reader) > self.max_lag)
            .map(|(key, _)| key)
            .collect();
        let too_slow = behind
            .into_iter()
            .map(|key| self.remove(state, key))
            .collect();
        self.drop_read(state);
        too_slow
    }

    fn read(
        &self,
        (key, id): (usize, u64),
        position: &mut u64,
        below: u64,
        batch: &mut Vec<(u64, Outbound)>,
    ) -> Read {
        let mut state = self.state.lock();
        let Some(slot) = state.readers.get(key).filter(|slot| slot.id == id) else {
            return Read::Detached;
        };
        let (mut next, codec) = (slot.next, slot.codec.index());
        let backlog = state.lag(slot);
        let mut oldest = None;
        let mut more = false;
        let first = state.first;
        for entry in state.entries.range_mut((next - first) as usize..) {
            if entry.stamp >= below {
                more = true;
                break;
            }
            entry.unread -= 1;
            next += 1;
            oldest.get_or_insert(entry.queued_at);
            if let Some(frame) = &entry.frames[codec] {
                let item = Outbound::Room {
                    message: entry.message.clone(),
                    frame: frame.clone(),
                };
                batch.push((entry.stamp, item));
            }
        }
        state.readers[key].next = next;
        *position = next;
        self.drop_read(&mut state);
        Read::Read {
            backlog,
            oldest,
            more,
        }
    }

    fn detach(&self, reader: &FeedReader) {
        let mut state = self.state.lock();
        if state
            .readers
            .get(reader.key)
            .is_some_and(|slot| slot.id == reader.id)
        {
            self.remove(&mut state, reader.key);
            self.drop_read(&mut state);
        }
    }

    /// Removes a reader and its claim on the entries it had not read.
    fn remove(&self, state: &mut FeedState, key: usize) -> Arc<SessionHandle> {
        let reader = state.readers.remove(key);
        state.codecs[reader.codec.index()] -= 1;
        let first = state.first;
        for entry in state.entries.range_mut((reader.next - first) as usize..) {
            entry.unread -= 1;
        }
        reader.session
    }

    /// Drops the oldest entries every reader has read.
    fn drop_read(&self, state: &mut FeedState) {
        let mut freed = 0;
        while state.entries.front().is_some_and(|entry| entry.unread == 0) {
            if let Some(entry) = state.entries.pop_front() {
                freed += entry
                    .frames
                    .iter()
                    .flatten()
                    .map(Message::len)
                    .sum::<usize>();
                state.first += 1;
            }
        }
        if freed > 0 {
            state.held -= freed;
            self.total_bytes.sub(freed as i64);
        }
    }
}

impl FeedState {
    /// Bytes (in its codec) waiting for `reader`.
    fn lag(&self, reader: &Reader) -> usize {
        let index = reader.codec.index();
        let start = self
            .entries
            .get((reader.next - self.first) as usize)
            .map_or(self.appended[index], |entry| entry.start[index]);
        (self.appended[index] - start) as usize
    }
}

impl Drop for Feed {
    fn drop(&mut self) {
        self.total_bytes.sub(self.state.get_mut().held as i64);
    }
}

impl FeedReader {
    /// Reads the entries stamped below `below` into `batch`, as room items with their stamps.
    /// Takes the feed's lock only when something was appended since the last read.
    pub fn read(&mut self, below: u64, batch: &mut Vec<(u64, Outbound)>) -> Read {
        if self.feed.head.load(Ordering::Acquire) <= self.next {
            return Read::Read {
                backlog: 0,
                oldest: None,
                more: false,
            };
        }
        self.feed
            .read((self.key, self.id), &mut self.next, below, batch)
    }
}

impl Drop for FeedReader {
    fn drop(&mut self) {
        self.feed.detach(self);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;
    use crate::queue::OutboundQueue;

    fn session(codec: Codec) -> Arc<SessionHandle> {
        Arc::new(SessionHandle {
            id: Arc::from("s"),
            user: Arc::from("u"),
            codec,
            queue: OutboundQueue::new(1 << 20, IntGauge::new("q", "q").unwrap()),
            link: None,
        })
    }

    fn feed(max_lag: usize) -> (Arc<Feed>, IntGauge) {
        let gauge = IntGauge::new("held", "held").unwrap();
        (Arc::new(Feed::new(max_lag, gauge.clone())), gauge)
    }

    /// A message's frame size in each codec: the compact codecs' frames are smaller.
    fn frame_len(codec: Codec, len: usize) -> usize {
        match codec {
            Codec::Json => len,
            Codec::MsgPack => len * 3 / 4 + 1,
            Codec::JsonDeflate => len / 2 + 1,
        }
    }

    fn append(feed: &Feed, order: &AtomicU64, offset: u64, len: usize) -> Appended {
        let message = Arc::new(RoomMessage {
            room: "r".into(),
            data: serde_json::Value::Null,
            offset,
            epoch: "e".into(),
            from: None,
        });
        feed.append(message, order, Instant::now(), |codec| {
            Some(Message::Binary(vec![0; frame_len(codec, len)].into()))
        })
    }

    /// Reads below `below`; the offsets read, and what the read said.
    fn read(reader: &mut FeedReader, below: u64) -> (Vec<u64>, Read) {
        let mut batch = Vec::new();
        let read = reader.read(below, &mut batch);
        let offsets = batch
            .iter()
            .map(|(_, item)| match item {
                Outbound::Room { message, .. } => message.offset,
                _ => panic!("a feed yields room items"),
            })
            .collect();
        (offsets, read)
    }

    fn held(feed: &Feed) -> usize {
        feed.state.lock().entries.len()
    }

    #[test]
    fn each_reader_reads_every_message_once_in_order_from_where_it_attached() {
        let (feed, gauge) = feed(1 << 20);
        let order = AtomicU64::new(0);
        let mut early = feed.attach(session(Codec::Json));
        append(&feed, &order, 1, 10);
        append(&feed, &order, 2, 10);
        let mut late = feed.attach(session(Codec::MsgPack));
        append(&feed, &order, 3, 10);
        assert_eq!(read(&mut early, u64::MAX).0, [1, 2, 3]);
        assert_eq!(held(&feed), 1, "the late reader has yet to read 3");
        assert_eq!(read(&mut late, u64::MAX).0, [3]);
        assert_eq!(read(&mut early, u64::MAX).0, Vec::<u64>::new());
        assert_eq!((held(&feed), gauge.get()), (0, 0), "read by all: dropped");
    }

    #[test]
    fn a_reader_that_leaves_gives_up_its_claim_on_what_it_did_not_read() {
        let (feed, gauge) = feed(1 << 20);
        let order = AtomicU64::new(0);
        let mut reading = feed.attach(session(Codec::Json));
        let leaving = feed.attach(session(Codec::JsonDeflate));
        append(&feed, &order, 1, 100);
        read(&mut reading, u64::MAX);
        assert_eq!(gauge.get(), (100 + 51) as i64, "both encodings held");
        drop(leaving);
        assert_eq!((held(&feed), gauge.get()), (0, 0));
    }

    #[test]
    fn messages_are_encoded_only_in_the_codecs_somebody_reads() {
        let (feed, _) = feed(1 << 20);
        let order = AtomicU64::new(0);
        let _json = feed.attach(session(Codec::Json));
        let mut encoded = Vec::new();
        let message = Arc::new(RoomMessage {
            room: "r".into(),
            data: serde_json::Value::Null,
            offset: 1,
            epoch: "e".into(),
            from: None,
        });
        feed.append(message, &order, Instant::now(), |codec| {
            encoded.push(codec);
            Some(Message::text("{}"))
        });
        assert_eq!(encoded, [Codec::Json]);
    }

    #[test]
    fn a_read_stops_at_the_first_entry_stamped_at_or_above_its_bound() {
        let (feed, _) = feed(1 << 20);
        let order = AtomicU64::new(0);
        let mut reader = feed.attach(session(Codec::Json));
        for offset in 1..=4 {
            append(&feed, &order, offset, 100);
        }
        // Stamped 0..4.
        let (offsets, found) = read(&mut reader, 2);
        assert_eq!(offsets, [1, 2]);
        assert!(matches!(
            found,
            Read::Read {
                backlog: 400,
                more: true,
                ..
            }
        ));
        let (offsets, found) = read(&mut reader, u64::MAX);
        assert_eq!(offsets, [3, 4]);
        assert!(matches!(
            found,
            Read::Read {
                backlog: 200,
                more: false,
                ..
            }
        ));
    }

    #[test]
    fn a_reader_that_stops_reading_is_detached_and_named_while_the_others_read_on() {
        let max_lag = 1000;
        let (feed, gauge) = feed(max_lag);
        let order = AtomicU64::new(0);
        let mut reading = feed.attach(session(Codec::Json));
        let stalled_session = session(Codec::Json);
        let mut stalled = feed.attach(stalled_session.clone());
        let mut named = Vec::new();
        for offset in 1..=40 {
            named.extend(append(&feed, &order, offset, 100).too_slow);
            assert_eq!(read(&mut reading, u64::MAX).0, [offset]);
            // Held for the stalled reader: at most its bound, a quarter more, and one entry.
            assert!(gauge.get() as usize <= max_lag + max_lag / 4 + 100);
        }
        assert_eq!(named.len(), 1);
        assert!(Arc::ptr_eq(&named[0], &stalled_session));
        assert_eq!(read(&mut stalled, u64::MAX).1, Read::Detached);
        assert_eq!((held(&feed), gauge.get()), (0, 0));
    }

    #[test]
    fn readers_on_other_threads_read_everything_in_order_while_it_is_appended() {
        let (feed, gauge) = feed(usize::MAX / 2);
        let order = Arc::new(AtomicU64::new(0));
        const MESSAGES: u64 = 20_000;
        let readers: Vec<_> = (0..4)
            .map(|n| feed.attach(session(Codec::ALL[n % Codec::ALL.len()])))
            .collect();
        let threads: Vec<_> = readers
            .into_iter()
            .map(|mut reader| {
                std::thread::spawn(move || {
                    let mut expected = 1;
                    while expected <= MESSAGES {
                        for offset in read(&mut reader, u64::MAX).0 {
                            assert_eq!(offset, expected, "in order, once each");
                            expected += 1;
                        }
                        std::thread::yield_now();
                    }
                })
            })
            .collect();
        for offset in 1..=MESSAGES {
            append(&feed, &order, offset, 16);
        }
        for thread in threads {
            thread.join().unwrap();
        }
        assert_eq!((held(&feed), gauge.get()), (0, 0));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Attach(usize),
        Detach(usize),
        Append(usize),
        /// A reader reads below the next stamp less a few.
        Read(usize, u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0..Codec::ALL.len()).prop_map(Op::Attach),
            (0..8usize).prop_map(Op::Detach),
            (1..300usize).prop_map(Op::Append),
            (0..8usize, 0..4u64).prop_map(|(reader, back)| Op::Read(reader, back)),
        ]
    }

    /// The model: each reader's unread messages (offset, size in its codec, stamp).
    struct ModelReader {
        reader: FeedReader,
        codec: Codec,
        unread: Vec<(u64, usize, u64)>,
        detached: bool,
    }

    proptest! {
        /// Against a model that keeps every reader's unread messages: a reader reads exactly
        /// what was appended after it attached, in order, up to its stamp bound; only a reader more
        /// than `max_lag` behind is detached; the feed holds exactly the entries some reader has
        /// not read, and the gauge their bytes.
        #[test]
        fn the_feed_behaves_as_one_queue_per_reader(ops in proptest::collection::vec(op(), 1..200)) {
            let max_lag = 2000;
            let (feed, gauge) = feed(max_lag);
            let order = AtomicU64::new(0);
            let mut readers: Vec<ModelReader> = Vec::new();
            let mut offset = 0;
            for op in ops {
                match op {
                    Op::Attach(codec) => {
                        let codec = Codec::ALL[codec];
                        readers.push(ModelReader {
                            reader: feed.attach(session(codec)),
                            codec,
                            unread: Vec::new(),
                            detached: false,
                        });
                    }
                    Op::Detach(n) => {
                        if n < readers.len() {
                            readers.remove(n);
                        }
                    }
                    Op::Append(len) => {
                        offset += 1;
                        let total: usize = Codec::ALL.iter().map(|&c| frame_len(c, len)).sum();
                        let stamp = order.load(Ordering::SeqCst);
                        let appended = append(&feed, &order, offset, len);
                        for model in readers.iter_mut().filter(|model| !model.detached) {
                            model.unread.push((offset, frame_len(model.codec, len), stamp));
                        }
                        let mut detached = 0;
                        for model in readers.iter_mut().filter(|model| !model.detached) {
                            let lag: usize = model.unread.iter().map(|(_, size, _)| size).sum();
                            let attached = feed.state.lock().readers.get(model.reader.key)
                                .is_some_and(|slot| slot.id == model.reader.id);
                            // Never detached within its bound; never left far past it.
                            prop_assert!(attached || lag > max_lag);
                            prop_assert!(!attached || lag <= max_lag + max_lag / 4 + total);
                            if !attached {
                                model.detached = true;
                                detached += 1;
                            }
                        }
                        prop_assert_eq!(appended.too_slow.len(), detached);
                    }
                    Op::Read(n, back) => {
                        let Some(model) = readers.get_mut(n) else { continue };
                        let below = order.load(Ordering::SeqCst).saturating_sub(back);
                        let (offsets, found) = read(&mut model.reader, below);
                        if model.detached {
                            prop_assert_eq!(found, Read::Detached);
                            continue;
                        }
                        let lag: usize = model.unread.iter().map(|(_, size, _)| size).sum();
                        let expected: Vec<u64> = model
                            .unread
                            .iter()
                            .take_while(|(_, _, stamp)| *stamp < below)
                            .map(|(offset, _, _)| *offset)
                            .collect();
                        prop_assert_eq!(&offsets, &expected);
                        let Read::Read { backlog, more, .. } = found else {
                            return Err(TestCaseError::fail("an attached reader was detached"));
                        };
                        prop_assert_eq!(backlog, lag);
                        prop_assert_eq!(more, expected.len() < model.unread.len());
                        model.unread.drain(..expected.len());
                    }
                }
                let wanted: BTreeSet<u64> = readers
                    .iter()
                    .filter(|model| !model.detached)
                    .flat_map(|model| model.unread.iter().map(|(offset, _, _)| *offset))
                    .collect();
                let state = feed.state.lock();
                let held: Vec<u64> = state.entries.iter().map(|entry| entry.message.offset).collect();
                // Held: from the oldest unread entry to the newest (an entry between two unread
                // ones stays until the older is read).
                match (wanted.first(), wanted.last()) {
                    (Some(&oldest), _) => {
                        prop_assert_eq!(held.first(), Some(&oldest));
                        prop_assert_eq!(held.last(), Some(&offset));
                    }
                    _ => prop_assert!(held.is_empty()),
                }
                let bytes: usize = state
                    .entries
                    .iter()
                    .flat_map(|entry| entry.frames.iter().flatten())
                    .map(Message::len)
                    .sum();
                prop_assert_eq!(gauge.get() as usize, bytes);
            }
        }
    }
}
