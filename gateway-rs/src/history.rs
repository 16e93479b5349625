//! Per-session bounded history and the resume plan (SPEC §5.1 `?since=<partition>:<offset>`).
//!
//! A session's history holds its most recent events in arrival order; entries leave only from
//! the front, so whatever it holds after its oldest entry is complete. A resume is answered
//! from the history when it reaches back to the client's position; otherwise the gap between
//! the position and the history (or the consumer's cursor when the history has nothing in
//! that partition) is read from Kafka first (see `kafka::replay`).

use std::collections::VecDeque;
use std::fmt;
use std::str::FromStr;

use axum::extract::ws::Utf8Bytes;

/// A Kafka position: partition and offset of one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Position {
    pub partition: i32,
    pub offset: i64,
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.partition, self.offset)
    }
}

impl FromStr for Position {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("since={s:?}: expected <partition>:<offset>, two non-negative integers");
        let (p, o) = s.split_once(':').ok_or_else(bad)?;
        // Digits only: Rust's integer parse also takes a leading '+'.
        if !(p.bytes().all(|b| b.is_ascii_digit()) && o.bytes().all(|b| b.is_ascii_digit())) {
            return Err(bad());
        }
        let partition: i32 = p.parse().map_err(|_| bad())?;
        let offset: i64 = o.parse().map_err(|_| bad())?;
        if partition < 0 || offset < 0 {
            return Err(bad());
        }
        Ok(Position { partition, offset })
    }
}

/// One delivered event: its position and the frame sent to clients (built once).
#[derive(Debug, Clone)]
pub struct Entry {
    pub position: Position,
    pub frame: Utf8Bytes,
    /// Milliseconds since the epoch when the event was produced (for the latency histogram).
    pub produced_ms: Option<i64>,
}

#[derive(Debug)]
pub struct History {
    entries: VecDeque<Entry>,
    capacity: usize,
    /// Whether entries were dropped to stay within `capacity`: then the history is complete
    /// only from its oldest entry, not from where the gateway started reading.
    truncated: bool,
}

/// How to answer a resume.
#[derive(Debug)]
pub enum ResumePlan {
    /// The history reaches back far enough: deliver these entries, then live ones.
    History(Vec<Entry>),
    /// Read the session's events in `partition` at offsets `from..until` from Kafka first, then
    /// deliver `then` (from the history), then live ones.
    Kafka {
        partition: i32,
        from: i64,
        until: i64,
        then: Vec<Entry>,
    },
    /// The position names a partition this gateway does not read.
    UnknownPartition,
    /// The position is past what this gateway has read of its partition: either the
    /// gateway is behind another replica (the client's next events are still to come here),
    /// or the position was never handed out (past the partition's end in Kafka). The
    /// connection asks Kafka which; `then` is the whole history.
    Ahead {
        partition: i32,
        offset: i64,
        then: Vec<Entry>,
    },
}

impl History {
    pub fn new(capacity: usize) -> History {
        History {
            // Grown with the first events: most sessions of idle connections have none.
            entries: VecDeque::new(),
            capacity,
            truncated: false,
        }
    }

    pub fn push(&mut self, entry: Entry) {
        if self.entries.len() == self.capacity {
            self.entries.pop_front();
            self.truncated = true;
        }
        self.entries.push_back(entry);
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.entries.iter()
    }

    /// The plan for a client whose last received event is `since`.
    ///
    /// `cursor(p)` is the offset of the last message of partition `p` the consumer has
    /// dispatched (`None` for a partition it does not read). It must be read while the
    /// session is locked, as the history is: any later event of the session reaches the
    /// client live, any earlier one is in the history or below the cursor.
    ///
    /// `complete_from(p)`: from this offset of `p` on, every event of the session is in its
    /// history unless the history was truncated (where the gateway started reading `p`, raised
    /// when sessions are forgotten). A client whose next event is at or after it needs no
    /// Kafka read, even when the session has no event there yet.
    pub fn plan(
        &self,
        since: Position,
        cursor: impl Fn(i32) -> Option<i64>,
        complete_from: impl Fn(i32) -> i64,
    ) -> ResumePlan {
        let Some(cur) = cursor(since.partition) else {
            return ResumePlan::UnknownPartition;
        };
        if since.offset > cur {
            return ResumePlan::Ahead {
                partition: since.partition,
                offset: since.offset,
                then: self.entries.iter().cloned().collect(),
            };
        }
        // The newest entry at or before `since` in its partition: everything after it is complete.
        if let Some(idx) = self
            .entries
            .iter()
            .rposition(|e| e.position.partition == since.partition && e.position.offset <= since.offset)
        {
            return ResumePlan::History(self.entries.iter().skip(idx + 1).cloned().collect());
        }
        // Nothing at or before `since`: every entry of that partition comes after it.
        let then: Vec<Entry> = self.entries.iter().cloned().collect();
        if !self.truncated && since.offset.saturating_add(1) >= complete_from(since.partition) {
            return ResumePlan::History(then);
        }
        // The gap runs up to the oldest entry of that partition, or up to the cursor when the
        // history has none there.
        let until = self
            .entries
            .iter()
            .find(|e| e.position.partition == since.partition)
            .map(|e| e.position.offset)
            .unwrap_or(cur + 1);
        let from = since.offset + 1;
        if from >= until {
            return ResumePlan::History(then);
        }
        ResumePlan::Kafka {
            partition: since.partition,
            from,
            until,
            then,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(p: i32, o: i64) -> Entry {
        Entry {
            position: Position {
                partition: p,
                offset: o,
            },
            frame: Utf8Bytes::from(format!("{p}:{o}")),
            produced_ms: None,
        }
    }

    /// No position is known complete without a history entry (the plans before `complete_from`).
    const NEVER: fn(i32) -> i64 = |_| i64::MAX;

    fn offsets(v: &[Entry]) -> Vec<i64> {
        v.iter().map(|e| e.position.offset).collect()
    }

    #[test]
    fn position_parses_strictly() {
        assert_eq!(
            "2:41".parse::<Position>().unwrap(),
            Position {
                partition: 2,
                offset: 41
            }
        );
        for bad in [
            "", "2", "2:", ":4", "-1:4", "1:-4", "a:b", "1:2:3", "1: 2", "+0:+101", "0:+1", "٣:4",
        ] {
            assert!(bad.parse::<Position>().is_err(), "{bad}");
        }
    }

    #[test]
    fn positions_where_the_history_is_complete_need_no_kafka() {
        let from_100 = |p: i32| if p == 0 { 100 } else { i64::MAX };
        let at = |offset| Position { partition: 0, offset };
        // A session with no event since the gateway started reading at 100: nothing to read.
        let mut h = History::new(4);
        match h.plan(at(99), |_| Some(180), from_100) {
            ResumePlan::History(v) => assert!(v.is_empty()),
            p => panic!("{p:?}"),
        }
        // Its events since then are all in the history.
        h.push(entry(0, 120));
        h.push(entry(0, 150));
        match h.plan(at(110), |_| Some(180), from_100) {
            ResumePlan::History(v) => assert_eq!(offsets(&v), vec![120, 150]),
            p => panic!("{p:?}"),
        }
        // Before where the gateway started: Kafka, up to the oldest entry.
        match h.plan(at(50), |_| Some(180), from_100) {
            ResumePlan::Kafka { from, until, .. } => assert_eq!((from, until), (51, 120)),
            p => panic!("{p:?}"),
        }
        // Once entries were dropped, only the history's own entries vouch for completeness.
        for o in [160, 170, 175] {
            h.push(entry(0, o));
        }
        match h.plan(at(110), |_| Some(180), from_100) {
            ResumePlan::Kafka { from, until, .. } => assert_eq!((from, until), (111, 150)),
            p => panic!("{p:?}"),
        }
    }

    #[test]
    fn bounded_history_drops_oldest() {
        let mut h = History::new(3);
        for o in 0..5 {
            h.push(entry(0, o * 10));
        }
        assert_eq!(h.len(), 3);
        match h.plan(
            Position {
                partition: 0,
                offset: 20,
            },
            |_| Some(40),
            NEVER,
        ) {
            ResumePlan::History(v) => assert_eq!(offsets(&v), vec![30, 40]),
            p => panic!("{p:?}"),
        }
    }

    #[test]
    fn resume_within_history() {
        let mut h = History::new(10);
        for o in [5, 9, 12] {
            h.push(entry(1, o));
        }
        // Exact hit, position between entries, position at the newest: all from history.
        let cur = |_| Some(12);
        match h.plan(
            Position {
                partition: 1,
                offset: 5,
            },
            cur,
            NEVER,
        ) {
            ResumePlan::History(v) => assert_eq!(offsets(&v), vec![9, 12]),
            p => panic!("{p:?}"),
        }
        match h.plan(
            Position {
                partition: 1,
                offset: 10,
            },
            cur,
            NEVER,
        ) {
            ResumePlan::History(v) => assert_eq!(offsets(&v), vec![12]),
            p => panic!("{p:?}"),
        }
        match h.plan(
            Position {
                partition: 1,
                offset: 12,
            },
            cur,
            NEVER,
        ) {
            ResumePlan::History(v) => assert!(v.is_empty()),
            p => panic!("{p:?}"),
        }
    }

    #[test]
    fn older_position_needs_kafka_up_to_the_oldest_entry() {
        let mut h = History::new(2);
        for o in [3, 7, 11] {
            h.push(entry(0, o));
        }
        match h.plan(
            Position {
                partition: 0,
                offset: 2,
            },
            |_| Some(11),
            NEVER,
        ) {
            ResumePlan::Kafka {
                partition,
                from,
                until,
                then,
            } => {
                assert_eq!((partition, from, until), (0, 3, 7));
                assert_eq!(offsets(&then), vec![7, 11]);
            }
            p => panic!("{p:?}"),
        }
    }

    #[test]
    fn empty_history_reads_kafka_up_to_the_cursor() {
        let h = History::new(4);
        match h.plan(
            Position {
                partition: 2,
                offset: 100,
            },
            |p| (p == 2).then_some(150),
            NEVER,
        ) {
            ResumePlan::Kafka {
                partition,
                from,
                until,
                then,
            } => {
                assert_eq!((partition, from, until), (2, 101, 151));
                assert!(then.is_empty());
            }
            p => panic!("{p:?}"),
        }
        // Already at the cursor: nothing missed.
        match h.plan(
            Position {
                partition: 2,
                offset: 150,
            },
            |_| Some(150),
            NEVER,
        ) {
            ResumePlan::History(v) => assert!(v.is_empty()),
            p => panic!("{p:?}"),
        }
        // Past the cursor: the connection must ask Kafka whether that position exists.
        match h.plan(
            Position {
                partition: 2,
                offset: 151,
            },
            |_| Some(150),
            NEVER,
        ) {
            ResumePlan::Ahead {
                partition: 2,
                offset: 151,
                then,
            } => assert!(then.is_empty()),
            p => panic!("{p:?}"),
        }
        assert!(matches!(
            h.plan(
                Position {
                    partition: 9,
                    offset: 1
                },
                |p| (p == 2).then_some(1),
                NEVER,
            ),
            ResumePlan::UnknownPartition
        ));
    }

    #[test]
    fn a_position_past_the_cursor_keeps_the_whole_history() {
        let mut h = History::new(4);
        h.push(entry(0, 3));
        h.push(entry(1, 4));
        match h.plan(
            Position {
                partition: 0,
                offset: 99,
            },
            |_| Some(4),
            NEVER,
        ) {
            ResumePlan::Ahead { then, .. } => assert_eq!(offsets(&then), vec![3, 4]),
            p => panic!("{p:?}"),
        }
    }

    #[test]
    fn gap_directly_before_history_needs_no_kafka() {
        let mut h = History::new(4);
        h.push(entry(0, 8));
        match h.plan(
            Position {
                partition: 0,
                offset: 7,
            },
            |_| Some(8),
            NEVER,
        ) {
            ResumePlan::History(v) => assert_eq!(offsets(&v), vec![8]),
            p => panic!("{p:?}"),
        }
    }
}
