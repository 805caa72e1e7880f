//! Read coalescing: which clients stream, and what ends the wait before their next read.
//!
//! A shard that reads a socket as soon as anything arrives wakes for every few messages, and each
//! read costs a syscall, an executor loop and a TCP ack. A client that streams publishes or acks
//! (and nothing else) is read at most once per `connection.read_coalesce_us` instead, unless
//! something it may be waiting for goes out first.
//!
//! Two kinds of output can end the wait. Answers to requests always do. Window answers (confirms,
//! deliveries to a prefetch-limited consumer) reopen a window the client may or may not have
//! filled: a publisher with 1,000 unconfirmed allowed and 130 sent per interval never waits for
//! them, and reading it once per interval halves the broker's CPU per message; one allowed 10
//! stops after 10 and would be held to 10 per interval. Which one a client is does not show in
//! its reads, so the meter measures it: streaming, it runs one period with window answers holding
//! the wait and one ending it, keeps the mode with the better rate (holding unless publishes or
//! settlements, counted apart, went more than a tenth slower), and measures again every
//! `PROBE_EVERY_PERIODS` periods. A probe that holds ends once an interval's messages are read
//! if the client has slowed, so a client that waits on its window is held back for about one
//! interval in every 65 periods. A period can be slow for reasons of its own (the shard paging,
//! the host), so a release is probed again after 8 periods, then 16 and 32 while probes keep
//! releasing.
//!
//! Invariants: the wait is always bounded by one interval; any command other than a publish or
//! an ack starts the meter over (not streaming, window answers ending the wait).

use std::time::{Duration, Instant};

/// Decides which clients stream: they send publishes and settlements (see `Session::is_streamed`)
/// and nothing else, fast enough that one coalescing interval gathers at least
/// `STREAMING_COMMANDS_MIN` of them on average. The rate is measured over periods of
/// `PERIOD_INTERVALS` intervals, so one thin read does not end streaming and a short burst does
/// not start it. It also decides whether window answers end the wait (see the module docs).
pub struct StreamMeter {
    interval: Duration,
    period_start: Instant,
    /// Streamed commands read in the current period.
    counted: Streamed,
    /// The verdict of the last period.
    streaming: bool,
    /// Whether window answers leave the wait alone in the current period.
    hold_window_answers: bool,
    /// While probing: the commands and length of the period before, run in the other mode.
    probe_from: Option<(Streamed, Duration)>,
    /// Streaming periods left before the next probe.
    periods_to_probe: u32,
    /// Probes in a row that released window answers (see `probe_gap`).
    releases_in_a_row: u32,
}

/// Streamed commands of one read or one period, by kind: a connection may publish and consume
/// at once, and holding window answers may slow one kind while the other goes on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Streamed {
    pub publishes: u64,
    /// Acks, nacks and rejects.
    pub settlements: u64,
}

impl Streamed {
    pub fn count(&mut self, publish: bool) {
        if publish {
            self.publishes += 1;
        } else {
            self.settlements += 1;
        }
    }

    fn total(self) -> u64 {
        self.publishes + self.settlements
    }

    fn add(&mut self, other: Streamed) {
        self.publishes += other.publishes;
        self.settlements += other.settlements;
    }
}

const STREAMING_COMMANDS_MIN: u64 = 8;
const PERIOD_INTERVALS: u32 = 4;
/// Streaming periods between two probes once a mode has been confirmed: with the default
/// interval, a probe every ~260 ms.
const PROBE_EVERY_PERIODS: u32 = 64;
/// Periods before the probe after a first release: a period can be slow for reasons of its own
/// (the shard paging, the host), so a release is checked again soon, then less often while the
/// probes keep releasing.
const RECHECK_RELEASE_PERIODS: u32 = 8;

impl StreamMeter {
    pub fn new(interval: Duration, now: Instant) -> StreamMeter {
        StreamMeter {
            interval,
            period_start: now,
            counted: Streamed::default(),
            streaming: false,
            hold_window_answers: false,
            probe_from: None,
            periods_to_probe: 1,
            releases_in_a_row: 0,
        }
    }

    /// Counts one read's streamed commands; `asked` if it also held something else (the client
    /// may be waiting for the answer), `drained` if it emptied the socket (a read that filled
    /// its buffer leaves more waiting). Returns whether to wait before the next read: the
    /// client streams and nothing is known to be waiting.
    pub fn observe(
        &mut self,
        now: Instant,
        streamed: Streamed,
        asked: bool,
        drained: bool,
    ) -> bool {
        if self.interval.is_zero() || asked {
            *self = StreamMeter::new(self.interval, now);
            return false;
        }
        self.counted.add(streamed);
        let elapsed = now.saturating_duration_since(self.period_start);
        if elapsed >= self.interval * PERIOD_INTERVALS {
            let intervals = elapsed.as_micros() / self.interval.as_micros();
            let needed = u128::from(STREAMING_COMMANDS_MIN) * intervals;
            self.streaming = u128::from(self.counted.total()) >= needed;
            self.choose_mode(self.counted, elapsed);
            self.period_start = now;
            self.counted = Streamed::default();
        } else if drained && elapsed >= self.interval && self.holding_slows_the_probe(elapsed) {
            // A client held back by its window shows it once an interval's messages are read:
            // release it now rather than hold it for the rest of the period.
            self.probe_from = None;
            self.settle(false);
        }
        self.streaming && drained
    }

    /// Whether a confirm or a prefetch-limited delivery leaves a coalesced read's wait alone.
    pub fn holds_window_answers(&self) -> bool {
        self.hold_window_answers
    }

    /// Whether a probe that holds window answers has been slower so far than the period before
    /// it (see `keeps_up`).
    fn holding_slows_the_probe(&self, elapsed: Duration) -> bool {
        match self.probe_from {
            Some(before) if self.hold_window_answers => !keeps_up((self.counted, elapsed), before),
            _ => false,
        }
    }

    /// At the end of a period of `counted` commands over `elapsed`: settles a probe, or starts
    /// one (the next period in the other mode) when it is due.
    fn choose_mode(&mut self, counted: Streamed, elapsed: Duration) {
        if let Some(before) = self.probe_from.take() {
            let now = (counted, elapsed);
            let (held, released) = if self.hold_window_answers {
                (now, before)
            } else {
                (before, now)
            };
            self.settle(keeps_up(held, released));
        } else if self.streaming {
            self.periods_to_probe = self.periods_to_probe.saturating_sub(1);
            if self.periods_to_probe == 0 {
                self.probe_from = Some((counted, elapsed));
                self.hold_window_answers = !self.hold_window_answers;
            }
        }
    }

    /// Ends a probe in mode `hold` and schedules the next one.
    fn settle(&mut self, hold: bool) {
        self.hold_window_answers = hold;
        if hold {
            self.releases_in_a_row = 0;
            self.periods_to_probe = PROBE_EVERY_PERIODS;
        } else {
            self.periods_to_probe = probe_gap(self.releases_in_a_row);
            self.releases_in_a_row = self.releases_in_a_row.saturating_add(1);
        }
    }
}

/// Periods before the next probe after `earlier` releases in a row and one more: 8, 16, 32,
/// then `PROBE_EVERY_PERIODS`.
fn probe_gap(earlier: u32) -> u32 {
    RECHECK_RELEASE_PERIODS
        .saturating_mul(1 << earlier.min(3))
        .min(PROBE_EVERY_PERIODS)
}

/// Whether the client kept up while window answers were held (`held`: commands over a time)
/// compared with a period that released them: holding costs less CPU per message, so it is kept
/// unless publishes or settlements went more than a tenth slower. A kind with fewer than one
/// command per interval in the released period is too thin to tell; any more counts, since a
/// wrong release only costs CPU, a wrong hold costs a slow consumer (a prefetch of 1 beside a
/// busy publisher) most of its rate.
fn keeps_up(held: (Streamed, Duration), released: (Streamed, Duration)) -> bool {
    let kinds = |streamed: Streamed| [streamed.publishes, streamed.settlements];
    let (held_micros, released_micros) = (held.1.as_micros(), released.1.as_micros());
    let thin = u64::from(PERIOD_INTERVALS);
    kinds(held.0)
        .into_iter()
        .zip(kinds(released.0))
        .all(|(held_count, released_count)| {
            released_count < thin
                || u128::from(held_count) * released_micros * 10
                    >= u128::from(released_count) * held_micros * 9
        })
}

#[cfg(test)]
mod tests {
    use super::{
        StreamMeter, Streamed, PERIOD_INTERVALS, PROBE_EVERY_PERIODS, RECHECK_RELEASE_PERIODS,
    };
    use std::time::{Duration, Instant};

    fn publishes(publishes: u64) -> Streamed {
        Streamed {
            publishes,
            settlements: 0,
        }
    }

    /// Feeds `meter` one read of `per_read` streamed commands every `every`, `reads` times;
    /// returns the last verdict and the time after the last read.
    fn stream(
        meter: &mut StreamMeter,
        mut now: Instant,
        every: Duration,
        per_read: u64,
        reads: u32,
    ) -> (bool, Instant) {
        let mut streaming = false;
        for _ in 0..reads {
            now += every;
            streaming = meter.observe(now, publishes(per_read), false, true);
        }
        (streaming, now)
    }

    const INTERVAL: Duration = Duration::from_micros(1000);

    #[test]
    fn a_client_streaming_above_the_rate_streams_after_one_period() {
        let start = Instant::now();
        let mut meter = StreamMeter::new(INTERVAL, start);
        // 4 commands every 250 µs: 16 per interval.
        let every = Duration::from_micros(250);
        let (streaming, _) = stream(&mut meter, start, every, 4, 15);
        assert!(!streaming, "no verdict before a whole period");
        let (streaming, now) = stream(&mut meter, start + every * 15, every, 4, 1);
        assert!(streaming);
        assert!(
            !meter.observe(now, publishes(0), false, false),
            "after a full read, more is waiting: no wait"
        );
        // One thin read does not end it; the next period's verdict does.
        assert!(meter.observe(now + every, publishes(1), false, true));
        let (streaming, _) = stream(&mut meter, now + every, INTERVAL, 1, 8);
        assert!(!streaming, "1 command per interval is not streaming");
    }

    #[test]
    fn a_slow_client_or_a_burst_after_idling_does_not_stream() {
        let start = Instant::now();
        let mut meter = StreamMeter::new(INTERVAL, start);
        // 5,000 messages a second, one per read: 5 per interval.
        let (streaming, now) = stream(&mut meter, start, Duration::from_micros(200), 1, 100);
        assert!(!streaming);
        // 50 at once after 20 ms of silence: 2.5 per interval over the period.
        assert!(!meter.observe(now + Duration::from_millis(20), publishes(50), false, true));
    }

    #[test]
    fn anything_but_publishes_and_acks_ends_streaming() {
        let start = Instant::now();
        let mut meter = StreamMeter::new(INTERVAL, start);
        let every = Duration::from_micros(100);
        let (streaming, now) = stream(&mut meter, start, every, 10, 50);
        assert!(streaming);
        assert!(!meter.observe(now + every, publishes(10), true, true));
        assert!(!meter.holds_window_answers(), "the probe starts over too");
        let (streaming, _) = stream(&mut meter, now + every, every, 10, 39);
        assert!(!streaming, "a new period must pass first");
    }

    #[test]
    fn a_zero_interval_never_streams() {
        let start = Instant::now();
        let mut meter = StreamMeter::new(Duration::ZERO, start);
        let (streaming, _) = stream(&mut meter, start, Duration::from_micros(10), 100, 1000);
        assert!(!streaming);
    }

    /// Feeds `meter` one read per interval of `publishes` publishes and, in turn, each of
    /// `settlements` (a connection that publishes and consumes).
    fn feed(meter: &mut StreamMeter, now: &mut Instant, publishes: u64, settlements: &[u64]) {
        for &settlements in settlements {
            *now += INTERVAL;
            let read = Streamed {
                publishes,
                settlements,
            };
            meter.observe(*now, read, false, true);
        }
    }

    /// Runs one period of `per_interval` commands, read once per interval; returns the mode the
    /// meter chose for the next one.
    fn period(meter: &mut StreamMeter, now: &mut Instant, per_interval: u64) -> bool {
        let (_, end) = stream(meter, *now, INTERVAL, per_interval, PERIOD_INTERVALS);
        *now = end;
        meter.holds_window_answers()
    }

    /// A client whose rate depends on the mode: `released` commands per interval while window
    /// answers end the wait, `held` while they do not. Returns the modes of `periods` periods.
    fn modes(released: u64, held: u64, periods: u32) -> Vec<bool> {
        let mut now = Instant::now();
        let mut meter = StreamMeter::new(INTERVAL, now);
        let mut modes = Vec::new();
        for _ in 0..periods {
            let rate = if meter.holds_window_answers() {
                held
            } else {
                released
            };
            modes.push(period(&mut meter, &mut now, rate));
        }
        modes
    }

    #[test]
    fn a_client_far_from_its_window_is_held_after_one_probe() {
        // A wide confirm window: as fast or faster when its reads gather.
        let modes = modes(100, 130, 3 * PROBE_EVERY_PERIODS);
        assert!(modes[0], "after the first streaming period, a probe holds");
        assert!(modes[1], "holding was not slower: kept");
        let released = modes.iter().filter(|hold| !**hold).count();
        assert!(
            released <= 3,
            "one probe of the other mode per round: {released}"
        );
    }

    #[test]
    fn a_client_held_back_by_its_window_is_released_after_one_probe() {
        // A window of 10 per read: 380 per interval answered at once, 10 held.
        let modes = modes(380, 10, 4 * PROBE_EVERY_PERIODS);
        assert!(modes[0], "the probe");
        assert!(!modes[1], "holding was slower: released");
        // Probes again after 8, 16, 32, then every 64 periods while they keep releasing.
        let probes: Vec<usize> = (0..modes.len()).filter(|&i| modes[i]).collect();
        let gaps: Vec<usize> = probes.windows(2).map(|w| w[1] - w[0]).collect();
        assert_eq!(gaps, [8, 16, 32, 64, 64, 64], "probes at {probes:?}");
    }

    #[test]
    fn a_release_from_one_slow_period_is_checked_again_soon() {
        // A client that gains from holding, with one slow period (the shard paging) in the
        // first probe's place.
        let mut now = Instant::now();
        let mut meter = StreamMeter::new(INTERVAL, now);
        assert!(period(&mut meter, &mut now, 100), "the probe holds");
        assert!(!period(&mut meter, &mut now, 20), "a slow period: released");
        // Released after its first interval: the rest of that period is the first of 8.
        for _ in 0..RECHECK_RELEASE_PERIODS - 2 {
            assert!(!period(&mut meter, &mut now, 100));
        }
        assert!(period(&mut meter, &mut now, 100), "checked again");
        assert!(period(&mut meter, &mut now, 130), "held");
        for _ in 0..PROBE_EVERY_PERIODS - 1 {
            assert!(period(&mut meter, &mut now, 130));
        }
        assert!(
            !period(&mut meter, &mut now, 130),
            "the next probe, a round later"
        );
    }

    #[test]
    fn a_probe_that_holds_ends_after_one_interval_if_the_client_slows() {
        let mut now = Instant::now();
        let mut meter = StreamMeter::new(INTERVAL, now);
        assert!(period(&mut meter, &mut now, 380), "the probe holds");
        now += INTERVAL / 2;
        assert!(meter.observe(now, publishes(5), false, true));
        assert!(
            meter.holds_window_answers(),
            "less than an interval: no verdict yet"
        );
        now += INTERVAL;
        meter.observe(now, publishes(5), false, false);
        assert!(
            meter.holds_window_answers(),
            "a full read: more is waiting, no verdict yet"
        );
        meter.observe(now, publishes(5), false, true);
        assert!(
            !meter.holds_window_answers(),
            "15 in 1.5 intervals against 380 in one: released"
        );
        // The next probe comes 8 periods later (the rest of this period is the first).
        let (_, end) = stream(&mut meter, now, INTERVAL, 380, PERIOD_INTERVALS - 1);
        now = end;
        for _ in 0..RECHECK_RELEASE_PERIODS - 2 {
            assert!(!period(&mut meter, &mut now, 380));
        }
        assert!(period(&mut meter, &mut now, 380), "the next probe");
    }

    #[test]
    fn a_probe_that_holds_a_fast_client_runs_its_whole_period() {
        let mut now = Instant::now();
        let mut meter = StreamMeter::new(INTERVAL, now);
        assert!(period(&mut meter, &mut now, 100));
        for _ in 0..PERIOD_INTERVALS {
            now += INTERVAL;
            meter.observe(now, publishes(130), false, true);
            assert!(meter.holds_window_answers());
        }
    }

    #[test]
    fn holding_is_kept_within_a_tenth_of_the_released_rate() {
        assert!(modes(100, 91, 2)[1], "9% slower: still held");
        assert!(!modes(100, 89, 2)[1], "11% slower: released");
    }

    #[test]
    fn a_consumer_slowed_beside_a_busy_publisher_is_released() {
        // One connection: a publisher with a wide window (1,000 per interval either way) and a
        // consumer with a small prefetch (its acks 100 per interval, 5 when held). Together
        // holding is under 9% slower, but the consumer alone is 95% slower.
        let mut now = Instant::now();
        let mut meter = StreamMeter::new(INTERVAL, now);
        feed(
            &mut meter,
            &mut now,
            1000,
            &[100; PERIOD_INTERVALS as usize],
        );
        assert!(meter.holds_window_answers(), "the probe");
        feed(&mut meter, &mut now, 1000, &[5]);
        assert!(!meter.holds_window_answers(), "released");
    }

    #[test]
    fn a_slow_consumer_beside_a_publisher_is_released() {
        // A consumer with a prefetch of 1 at 5 acks per interval, 1 when held, beside a
        // publisher at 500.
        let mut now = Instant::now();
        let mut meter = StreamMeter::new(INTERVAL, now);
        feed(&mut meter, &mut now, 500, &[5; PERIOD_INTERVALS as usize]);
        assert!(meter.holds_window_answers(), "the probe");
        feed(&mut meter, &mut now, 500, &[1]);
        assert!(!meter.holds_window_answers(), "released");
    }

    #[test]
    fn a_thin_kind_does_not_decide() {
        // A publisher with a wide window and an ack now and then: 3 in the released period.
        let mut now = Instant::now();
        let mut meter = StreamMeter::new(INTERVAL, now);
        feed(&mut meter, &mut now, 100, &[3, 0, 0, 0]);
        assert!(meter.holds_window_answers(), "the probe");
        for _ in 0..PERIOD_INTERVALS {
            feed(&mut meter, &mut now, 100, &[0]);
            assert!(meter.holds_window_answers());
        }
    }

    #[test]
    fn a_probe_that_stops_streaming_still_decides() {
        // Held, a window of 5 falls under the streaming rate; the probe must still release it.
        let mut now = Instant::now();
        let mut meter = StreamMeter::new(INTERVAL, now);
        assert!(period(&mut meter, &mut now, 100));
        assert!(!period(&mut meter, &mut now, 5));
        assert!(!meter.streaming, "the held period was not streaming");
    }
}
