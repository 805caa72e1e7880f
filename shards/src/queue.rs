//! One AMQP queue as its owning shard holds it: ready messages in order, messages delivered and
//! not yet settled, and the consumers it dispatches to.
//!
//! A message's life:
//!
//! ```text
//! publish --> Ready --dispatch/get--> Unacked --ack--> gone
//!               ^                        |
//!               +--------requeue---------+   (redelivered = true, back at its old position)
//! ```
//!
//! A no-ack delivery goes straight from Ready to gone.
//!
//! Credit: a consumer receives a message only while it holds credit, which its connection's shard
//! grants (prefetch) and re-grants as the client settles deliveries. The queue never delivers past
//! the credit it was given, so the prefetch limit holds however far apart the two shards are.
//!
//! Invariants (checked by `check_invariants` in tests and debug builds):
//! - `ready` is sorted by message id, and no id is both ready and unacked;
//! - every consumer key appears once.

use std::collections::VecDeque;

use ahash::HashMap;

use crate::message::Message;
use crate::ShardId;

pub type MessageId = u64;

/// A consumer, named by the connection that owns it and a number that connection chose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConsumerKey {
    pub shard: ShardId,
    pub connection: u64,
    pub consumer: u64,
}

/// A channel that holds unacked messages (through a consumer or basic.get).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChannelKey {
    pub shard: ShardId,
    pub connection: u64,
    pub channel: u16,
}

/// How many more deliveries a consumer may receive before its connection grants more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credit {
    Limited(u32),
    Unlimited,
}

impl Credit {
    fn available(self) -> bool {
        !matches!(self, Credit::Limited(0))
    }

    fn take_one(&mut self) {
        if let Credit::Limited(n) = self {
            *n = n.saturating_sub(1);
        }
    }
}

#[derive(Debug, Clone)]
pub struct Consumer {
    pub key: ConsumerKey,
    pub channel: ChannelKey,
    pub no_ack: bool,
    pub exclusive: bool,
    pub credit: Credit,
    /// Credit comes from a pool its channel shares among consumers (basic.qos global): when
    /// the consumer runs out while messages wait, the queue asks for more (see `dispatch`).
    pub on_demand: bool,
    /// Asked for credit and not answered yet: ask once per starvation.
    pub asked: bool,
}

/// A ready message: its id with the redelivered flag packed into the top bit (72 bytes per
/// queued message instead of 80; ids never reach 2^63).
#[derive(Debug, Clone)]
struct Ready {
    tagged_id: u64,
    message: Message,
}

const REDELIVERED_BIT: u64 = 1 << 63;

impl Ready {
    fn new(id: MessageId, message: Message, redelivered: bool) -> Ready {
        debug_assert!(id < REDELIVERED_BIT);
        Ready {
            tagged_id: id | if redelivered { REDELIVERED_BIT } else { 0 },
            message,
        }
    }

    fn id(&self) -> MessageId {
        self.tagged_id & !REDELIVERED_BIT
    }

    fn redelivered(&self) -> bool {
        self.tagged_id & REDELIVERED_BIT != 0
    }
}

#[derive(Debug, Clone)]
struct Unacked {
    message: Message,
    holder: ChannelKey,
}

/// One message handed to a consumer.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub consumer: ConsumerKey,
    pub id: MessageId,
    pub message: Message,
    pub redelivered: bool,
    /// The message left the queue for good (a no-ack consumer).
    pub no_ack: bool,
}

/// A message taken by basic.get.
#[derive(Debug, Clone)]
pub struct Got {
    pub id: MessageId,
    pub message: Message,
    pub redelivered: bool,
    /// Ready messages left after this one.
    pub remaining: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsumeRefusal {
    /// An exclusive consumer holds the queue.
    ExclusiveConsumerPresent,
    /// An exclusive consume was asked for while consumers exist.
    ConsumersPresent,
}

#[derive(Debug, Default)]
pub struct Queue {
    ready: VecDeque<Ready>,
    ready_bytes: usize,
    unacked: HashMap<MessageId, Unacked>,
    consumers: Vec<Consumer>,
    /// Index in `consumers` to try first on the next dispatch (round-robin).
    cursor: usize,
    next_id: MessageId,
}

impl Queue {
    pub fn new() -> Queue {
        Queue::default()
    }

    /// Ready messages (the count declare-ok and get-ok report).
    pub fn message_count(&self) -> u32 {
        u32::try_from(self.ready.len()).unwrap_or(u32::MAX)
    }

    pub fn ready_bytes(&self) -> usize {
        self.ready_bytes
    }

    pub fn unacked_count(&self) -> usize {
        self.unacked.len()
    }

    pub fn consumer_count(&self) -> u32 {
        u32::try_from(self.consumers.len()).unwrap_or(u32::MAX)
    }

    pub fn consumers(&self) -> &[Consumer] {
        &self.consumers
    }

    pub fn publish(&mut self, message: Message) -> MessageId {
        let id = self.next_id;
        self.next_id += 1;
        self.ready_bytes += message.size_bytes();
        self.ready.push_back(Ready::new(id, message, false));
        id
    }

    pub fn add_consumer(&mut self, consumer: Consumer) -> Result<(), ConsumeRefusal> {
        if self.consumers.iter().any(|c| c.exclusive) {
            return Err(ConsumeRefusal::ExclusiveConsumerPresent);
        }
        if consumer.exclusive && !self.consumers.is_empty() {
            return Err(ConsumeRefusal::ConsumersPresent);
        }
        debug_assert!(self.consumers.iter().all(|c| c.key != consumer.key));
        self.consumers.push(consumer);
        Ok(())
    }

    /// Removes a consumer; its unacked messages stay unacked (the channel still holds them).
    pub fn remove_consumer(&mut self, key: ConsumerKey) -> bool {
        let Some(index) = self.consumers.iter().position(|c| c.key == key) else {
            return false;
        };
        self.consumers.remove(index);
        if self.cursor > index {
            self.cursor -= 1;
        }
        true
    }

    /// Removes every consumer `channel` owns; returns their keys.
    pub fn remove_consumers_of(&mut self, channel: ChannelKey) -> Vec<ConsumerKey> {
        let keys: Vec<ConsumerKey> = self
            .consumers
            .iter()
            .filter(|c| c.channel == channel)
            .map(|c| c.key)
            .collect();
        for key in &keys {
            self.remove_consumer(*key);
        }
        keys
    }

    /// Adds credit to a consumer. Unknown consumers (already cancelled) are ignored.
    pub fn grant_credit(&mut self, key: ConsumerKey, amount: u32) {
        if let Some(consumer) = self.consumers.iter_mut().find(|c| c.key == key) {
            if let Credit::Limited(n) = &mut consumer.credit {
                *n = n.saturating_add(amount);
            }
            consumer.asked = false;
        }
    }

    /// On-demand consumers that ran out of credit while messages are ready, each reported once
    /// until credit is granted again: (consumer, ready messages).
    pub fn credit_wanted(&mut self, out: &mut Vec<(ConsumerKey, u32)>) {
        if self.ready.is_empty() {
            return;
        }
        let ready = self.message_count();
        for consumer in &mut self.consumers {
            if consumer.on_demand && !consumer.credit.available() && !consumer.asked {
                consumer.asked = true;
                out.push((consumer.key, ready));
            }
        }
    }

    /// Hands ready messages to consumers round-robin, as far as their credit goes.
    pub fn dispatch(&mut self, out: &mut Vec<Delivery>) {
        while !self.ready.is_empty() && !self.consumers.is_empty() {
            let count = self.consumers.len();
            let Some(offset) = (0..count).find(|offset| {
                self.consumers[(self.cursor + offset) % count]
                    .credit
                    .available()
            }) else {
                return;
            };
            let index = (self.cursor + offset) % count;
            self.cursor = (index + 1) % count;
            let Some(ready) = self.ready.pop_front() else {
                return;
            };
            self.ready_bytes -= ready.message.size_bytes();
            let consumer = &mut self.consumers[index];
            consumer.credit.take_one();
            if !consumer.no_ack {
                self.unacked.insert(
                    ready.id(),
                    Unacked {
                        message: ready.message.clone(),
                        holder: consumer.channel,
                    },
                );
            }
            out.push(Delivery {
                consumer: consumer.key,
                id: ready.id(),
                redelivered: ready.redelivered(),
                no_ack: consumer.no_ack,
                message: ready.message,
            });
        }
    }

    /// basic.get: the first ready message, if any.
    pub fn get(&mut self, holder: ChannelKey, no_ack: bool) -> Option<Got> {
        let ready = self.ready.pop_front()?;
        self.ready_bytes -= ready.message.size_bytes();
        if !no_ack {
            self.unacked.insert(
                ready.id(),
                Unacked {
                    message: ready.message.clone(),
                    holder,
                },
            );
        }
        Some(Got {
            id: ready.id(),
            redelivered: ready.redelivered(),
            message: ready.message,
            remaining: self.message_count(),
        })
    }

    /// Settles delivered messages for good; returns how many were unacked. The ids of the
    /// persistent ones are added to `persistent` (they must be logged as settled).
    pub fn ack(&mut self, ids: &[MessageId], persistent: &mut Vec<MessageId>) -> usize {
        let mut settled = 0;
        for id in ids {
            if let Some(unacked) = self.unacked.remove(id) {
                settled += 1;
                if unacked.message.is_persistent() {
                    persistent.push(*id);
                }
            }
        }
        settled
    }

    /// Puts a message recovered from the log back, in id order, before the queue serves.
    pub fn restore(&mut self, id: MessageId, message: Message, redelivered: bool) {
        debug_assert!(self.ready.back().is_none_or(|last| last.id() < id));
        self.next_id = self.next_id.max(id + 1);
        self.ready_bytes += message.size_bytes();
        self.ready.push_back(Ready::new(id, message, redelivered));
    }

    /// Puts delivered messages back where they were, marked redelivered.
    pub fn requeue(&mut self, ids: &[MessageId]) -> usize {
        let mut requeued = 0;
        for id in ids {
            if let Some(unacked) = self.unacked.remove(id) {
                self.insert_ready(*id, unacked.message);
                requeued += 1;
            }
        }
        requeued
    }

    /// Requeues everything `channel` holds (the channel closed without settling).
    pub fn requeue_all_of(&mut self, channel: ChannelKey) -> usize {
        let mut ids: Vec<MessageId> = self
            .unacked
            .iter()
            .filter(|(_, u)| u.holder == channel)
            .map(|(id, _)| *id)
            .collect();
        ids.sort_unstable();
        self.requeue(&ids)
    }

    fn insert_ready(&mut self, id: MessageId, message: Message) {
        let position = self.ready.partition_point(|r| r.id() < id);
        self.ready_bytes += message.size_bytes();
        self.ready.insert(position, Ready::new(id, message, true));
    }

    /// A message still in the queue, ready or delivered: (message, delivered before).
    pub fn find(&self, id: MessageId) -> Option<(&Message, bool)> {
        if let Some(unacked) = self.unacked.get(&id) {
            return Some((&unacked.message, true));
        }
        let position = self.ready.partition_point(|r| r.id() < id);
        self.ready
            .get(position)
            .filter(|r| r.id() == id)
            .map(|r| (&r.message, r.redelivered()))
    }

    /// Ready messages in order: (id, message, redelivered).
    pub fn ready_messages(&self) -> impl Iterator<Item = (MessageId, &Message, bool)> {
        self.ready
            .iter()
            .map(|r| (r.id(), &r.message, r.redelivered()))
    }

    /// Drops every ready message; returns how many. The ids of the persistent ones are added
    /// to `persistent`.
    pub fn purge(&mut self, persistent: &mut Vec<MessageId>) -> u32 {
        let count = self.message_count();
        persistent.extend(
            self.ready
                .iter()
                .filter(|r| r.message.is_persistent())
                .map(Ready::id),
        );
        self.ready.clear();
        self.ready_bytes = 0;
        count
    }

    /// Panics if an invariant is broken. For tests and debug builds.
    pub fn check_invariants(&self) {
        let mut previous = None;
        let mut bytes = 0;
        for ready in &self.ready {
            assert!(previous < Some(ready.id()), "ready out of order");
            assert!(
                !self.unacked.contains_key(&ready.id()),
                "id both ready and unacked"
            );
            previous = Some(ready.id());
            bytes += ready.message.size_bytes();
        }
        assert_eq!(bytes, self.ready_bytes, "ready_bytes drifted");
        for (i, a) in self.consumers.iter().enumerate() {
            assert!(self.consumers[i + 1..].iter().all(|b| b.key != a.key));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn message(body: &str) -> Message {
        Message::new(b"", b"q", &[0, 0], Bytes::from(body.to_string()), false)
    }

    const CHANNEL: ChannelKey = ChannelKey {
        shard: ShardId(1),
        connection: 7,
        channel: 1,
    };

    fn consumer(n: u64, credit: Credit) -> Consumer {
        Consumer {
            key: ConsumerKey {
                shard: ShardId(1),
                connection: 7,
                consumer: n,
            },
            channel: CHANNEL,
            no_ack: false,
            exclusive: false,
            credit,
            on_demand: false,
            asked: false,
        }
    }

    fn bodies(deliveries: &[Delivery]) -> Vec<String> {
        deliveries
            .iter()
            .map(|d| String::from_utf8_lossy(d.message.body()).into_owned())
            .collect()
    }

    #[test]
    fn round_robin_within_credit() {
        let mut queue = Queue::new();
        for i in 0..5 {
            queue.publish(message(&i.to_string()));
        }
        queue.add_consumer(consumer(1, Credit::Limited(1))).unwrap();
        queue
            .add_consumer(consumer(2, Credit::Limited(10)))
            .unwrap();
        let mut out = Vec::new();
        queue.dispatch(&mut out);
        let to: Vec<u64> = out.iter().map(|d| d.consumer.consumer).collect();
        assert_eq!(to, vec![1, 2, 2, 2, 2]);
        assert_eq!(bodies(&out), vec!["0", "1", "2", "3", "4"]);
        assert_eq!(queue.unacked_count(), 5);
        queue.check_invariants();
    }

    #[test]
    fn credit_stops_and_resumes_dispatch() {
        let mut queue = Queue::new();
        for i in 0..3 {
            queue.publish(message(&i.to_string()));
        }
        queue.add_consumer(consumer(1, Credit::Limited(1))).unwrap();
        let mut out = Vec::new();
        queue.dispatch(&mut out);
        assert_eq!(out.len(), 1);
        queue.dispatch(&mut out);
        assert_eq!(out.len(), 1, "no credit, no delivery");
        queue.ack(&[out[0].id], &mut Vec::new());
        queue.grant_credit(out[0].consumer, 1);
        queue.dispatch(&mut out);
        assert_eq!(bodies(&out), vec!["0", "1"]);
    }

    #[test]
    fn requeued_messages_return_to_their_position_marked_redelivered() {
        let mut queue = Queue::new();
        for i in 0..4 {
            queue.publish(message(&i.to_string()));
        }
        let first = queue.get(CHANNEL, false).unwrap();
        let second = queue.get(CHANNEL, false).unwrap();
        assert_eq!(second.remaining, 2);
        queue.requeue(&[second.id, first.id]);
        queue.check_invariants();
        let again: Vec<Got> = (0..4).map(|_| queue.get(CHANNEL, true).unwrap()).collect();
        let order: Vec<String> = again
            .iter()
            .map(|g| String::from_utf8_lossy(g.message.body()).into_owned())
            .collect();
        assert_eq!(order, vec!["0", "1", "2", "3"]);
        assert!(again[0].redelivered && again[1].redelivered);
        assert!(!again[2].redelivered);
        assert!(queue.get(CHANNEL, true).is_none());
    }

    #[test]
    fn no_ack_deliveries_are_not_kept() {
        let mut queue = Queue::new();
        queue.publish(message("a"));
        let mut c = consumer(1, Credit::Unlimited);
        c.no_ack = true;
        queue.add_consumer(c).unwrap();
        let mut out = Vec::new();
        queue.dispatch(&mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(queue.unacked_count(), 0);
    }

    #[test]
    fn exclusive_consumers_are_alone() {
        let mut queue = Queue::new();
        let mut exclusive = consumer(1, Credit::Unlimited);
        exclusive.exclusive = true;
        queue.add_consumer(exclusive).unwrap();
        assert_eq!(
            queue.add_consumer(consumer(2, Credit::Unlimited)),
            Err(ConsumeRefusal::ExclusiveConsumerPresent)
        );
        let mut queue = Queue::new();
        queue.add_consumer(consumer(1, Credit::Unlimited)).unwrap();
        let mut exclusive = consumer(2, Credit::Unlimited);
        exclusive.exclusive = true;
        assert_eq!(
            queue.add_consumer(exclusive),
            Err(ConsumeRefusal::ConsumersPresent)
        );
    }

    #[test]
    fn closing_a_channel_requeues_what_it_held() {
        let mut queue = Queue::new();
        for i in 0..3 {
            queue.publish(message(&i.to_string()));
        }
        queue.add_consumer(consumer(1, Credit::Unlimited)).unwrap();
        let mut out = Vec::new();
        queue.dispatch(&mut out);
        assert_eq!(queue.remove_consumers_of(CHANNEL).len(), 1);
        assert_eq!(queue.requeue_all_of(CHANNEL), 3);
        assert_eq!(queue.message_count(), 3);
        queue.check_invariants();
    }

    #[test]
    fn purge_drops_ready_but_not_unacked() {
        let mut queue = Queue::new();
        for i in 0..3 {
            queue.publish(message(&i.to_string()));
        }
        let held = queue.get(CHANNEL, false).unwrap();
        assert_eq!(queue.purge(&mut Vec::new()), 2);
        assert_eq!(queue.message_count(), 0);
        assert_eq!(queue.requeue(&[held.id]), 1);
        assert_eq!(queue.message_count(), 1);
        assert_eq!(queue.ready_bytes(), held.message.size_bytes());
    }

    #[test]
    fn on_demand_consumers_ask_once_per_starvation() {
        let mut queue = Queue::new();
        let mut c = consumer(1, Credit::Limited(0));
        c.on_demand = true;
        queue.add_consumer(c).unwrap();
        let mut wants = Vec::new();
        queue.credit_wanted(&mut wants);
        assert!(wants.is_empty(), "nothing ready, nothing to ask for");
        queue.publish(message("a"));
        queue.publish(message("b"));
        queue.credit_wanted(&mut wants);
        assert_eq!(wants.len(), 1);
        assert_eq!(wants[0].1, 2);
        queue.credit_wanted(&mut wants);
        assert_eq!(wants.len(), 1, "asked already");
        queue.grant_credit(wants[0].0, 1);
        let mut out = Vec::new();
        queue.dispatch(&mut out);
        assert_eq!(out.len(), 1);
        queue.credit_wanted(&mut wants);
        assert_eq!(wants.len(), 2, "starved again with one ready");
    }

    #[test]
    fn unknown_ids_are_ignored() {
        let mut queue = Queue::new();
        assert_eq!(queue.ack(&[42], &mut Vec::new()), 0);
        assert_eq!(queue.requeue(&[42]), 0);
    }
}
