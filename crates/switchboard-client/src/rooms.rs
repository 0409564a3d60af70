use std::collections::HashMap;

use switchboard_protocol::{RoomMessage, StreamPosition};

/// The rooms this client is subscribed to and the last stream position it saw in each: what
/// it resubscribes with (`since`) after a reconnect, and what it deduplicates messages against.
#[derive(Debug, Default)]
pub(crate) struct Rooms {
    rooms: HashMap<String, RoomState>,
}

#[derive(Debug)]
struct RoomState {
    position: StreamPosition,
    presence_events: bool,
}

/// Where to resume one room after a reconnect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ResumePoint {
    pub(crate) room: String,
    pub(crate) since: StreamPosition,
    pub(crate) presence_events: bool,
}

impl Rooms {
    /// Records a successful `subscribe` reply. `latest` is the reply's position (the room's
    /// latest offset). When the subscribe carried `since` and the server recovered from it, the
    /// missed messages follow the reply, so the position stays at `since` until they arrive;
    /// otherwise nothing older than `latest` will be sent. Offset 0 ("nothing seen") recovers
    /// in any epoch: a room without state tells its subscribers an epoch it does not keep.
    pub(crate) fn subscribed(
        &mut self,
        room: &str,
        latest: StreamPosition,
        since: Option<&StreamPosition>,
        recovered: bool,
        presence_events: bool,
    ) {
        let position = match since {
            Some(since) if recovered && (since.epoch == latest.epoch || since.offset == 0) => {
                StreamPosition {
                    offset: since.offset.min(latest.offset),
                    epoch: latest.epoch,
                }
            }
            _ => latest,
        };
        self.rooms.insert(
            room.to_owned(),
            RoomState {
                position,
                presence_events,
            },
        );
    }

    /// Forgets a room; returns whether it was tracked.
    pub(crate) fn unsubscribed(&mut self, room: &str) -> bool {
        self.rooms.remove(room).is_some()
    }

    /// Whether to deliver `message`, advancing the room's position if so. A message at or
    /// before the last seen offset of the same epoch is a duplicate (a replay overlapping live
    /// delivery); a new epoch restarts the count. Rooms not tracked (e.g. a message racing a
    /// subscribe or unsubscribe) are delivered as they come.
    pub(crate) fn accept(&mut self, message: &RoomMessage) -> bool {
        let Some(state) = self.rooms.get_mut(&message.room) else {
            return true;
        };
        if state.position.epoch == message.epoch && message.offset <= state.position.offset {
            return false;
        }
        state.position = StreamPosition {
            offset: message.offset,
            epoch: message.epoch.clone(),
        };
        true
    }

    /// Every tracked room with the position to resubscribe from.
    pub(crate) fn resume_points(&self) -> Vec<ResumePoint> {
        self.rooms
            .iter()
            .map(|(room, state)| ResumePoint {
                room: room.clone(),
                since: state.position.clone(),
                presence_events: state.presence_events,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn at(offset: u64, epoch: &str) -> StreamPosition {
        StreamPosition {
            offset,
            epoch: epoch.into(),
        }
    }

    fn message(room: &str, offset: u64, epoch: &str) -> RoomMessage {
        RoomMessage {
            room: room.into(),
            data: json!(offset),
            offset,
            epoch: epoch.into(),
            from: None,
        }
    }

    fn position(rooms: &Rooms, room: &str) -> Option<StreamPosition> {
        rooms
            .resume_points()
            .into_iter()
            .find(|point| point.room == room)
            .map(|point| point.since)
    }

    #[test]
    fn fresh_subscription_starts_at_the_latest_offset() {
        let mut rooms = Rooms::default();
        rooms.subscribed("chat", at(3, "e1"), None, false, false);
        assert!(!rooms.accept(&message("chat", 3, "e1")));
        assert!(rooms.accept(&message("chat", 4, "e1")));
        assert_eq!(position(&rooms, "chat"), Some(at(4, "e1")));
    }

    #[test]
    fn duplicates_and_stale_messages_are_dropped() {
        let mut rooms = Rooms::default();
        rooms.subscribed("chat", at(0, "e1"), None, false, false);
        let delivered: Vec<u64> = [1, 2, 2, 1, 3, 5, 4, 5, 6]
            .into_iter()
            .filter(|offset| rooms.accept(&message("chat", *offset, "e1")))
            .collect();
        assert_eq!(delivered, [1, 2, 3, 5, 6]);
        assert_eq!(position(&rooms, "chat"), Some(at(6, "e1")));
    }

    #[test]
    fn a_new_epoch_restarts_the_count() {
        let mut rooms = Rooms::default();
        rooms.subscribed("chat", at(10, "e1"), None, false, false);
        assert!(rooms.accept(&message("chat", 1, "e2")));
        assert!(!rooms.accept(&message("chat", 1, "e2")));
        assert!(rooms.accept(&message("chat", 2, "e2")));
        assert_eq!(position(&rooms, "chat"), Some(at(2, "e2")));
    }

    #[test]
    fn recovered_resubscribe_keeps_since_so_the_replay_is_delivered() {
        let mut rooms = Rooms::default();
        rooms.subscribed("chat", at(0, "e1"), None, false, true);
        assert!(rooms.accept(&message("chat", 1, "e1")));
        assert!(rooms.accept(&message("chat", 2, "e1")));
        let [point] = rooms.resume_points().try_into().expect("one room");
        assert_eq!(
            point,
            ResumePoint {
                room: "chat".into(),
                since: at(2, "e1"),
                presence_events: true
            }
        );

        // Reconnected: the server has 5 messages now and replays 3..=5 after the reply.
        rooms.subscribed("chat", at(5, "e1"), Some(&point.since), true, true);
        let delivered: Vec<u64> = [2, 3, 4, 4, 5, 5, 6]
            .into_iter()
            .filter(|offset| rooms.accept(&message("chat", *offset, "e1")))
            .collect();
        assert_eq!(delivered, [3, 4, 5, 6]);
    }

    #[test]
    fn a_recovered_resubscribe_from_offset_zero_delivers_the_replay_in_the_new_epoch() {
        let mut rooms = Rooms::default();
        // Subscribed to a room without state: offset 0 and an epoch the server did not keep.
        rooms.subscribed("chat", at(0, "unkept"), None, false, false);
        let [point] = rooms.resume_points().try_into().expect("one room");
        // Reconnected: three messages were published meanwhile, in the room's own epoch.
        rooms.subscribed("chat", at(3, "e1"), Some(&point.since), true, false);
        let delivered: Vec<u64> = [1, 2, 3, 3, 4]
            .into_iter()
            .filter(|offset| rooms.accept(&message("chat", *offset, "e1")))
            .collect();
        assert_eq!(delivered, [1, 2, 3, 4]);
    }

    #[test]
    fn unrecovered_resubscribe_jumps_to_the_latest_position() {
        let mut rooms = Rooms::default();
        rooms.subscribed("chat", at(2, "e1"), None, false, false);
        rooms.subscribed("chat", at(7, "e2"), Some(&at(2, "e1")), false, false);
        assert_eq!(position(&rooms, "chat"), Some(at(7, "e2")));
        assert!(!rooms.accept(&message("chat", 7, "e2")));
        assert!(rooms.accept(&message("chat", 8, "e2")));

        // `since` ahead of the room (a stale position from the application) is clamped, so
        // the next real message is not taken for a duplicate.
        rooms.subscribed("news", at(4, "e1"), Some(&at(90, "e1")), true, false);
        assert_eq!(position(&rooms, "news"), Some(at(4, "e1")));
        assert!(rooms.accept(&message("news", 5, "e1")));
    }

    #[test]
    fn untracked_rooms_pass_through_and_unsubscribe_forgets() {
        let mut rooms = Rooms::default();
        assert!(rooms.accept(&message("other", 1, "e1")));
        assert!(rooms.accept(&message("other", 1, "e1")));
        assert!(rooms.resume_points().is_empty());

        rooms.subscribed("chat", at(1, "e1"), None, false, false);
        rooms.subscribed("news", at(1, "e1"), None, false, false);
        assert!(rooms.unsubscribed("chat"));
        assert!(!rooms.unsubscribed("chat"));
        let names: Vec<String> = rooms
            .resume_points()
            .into_iter()
            .map(|point| point.room)
            .collect();
        assert_eq!(names, ["news"]);
    }
}
