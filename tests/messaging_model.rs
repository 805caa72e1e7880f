//! A randomized model test: long random sequences of declare, bind, unbind, publish, consume,
//! receive-and-ack, get (then ack, requeue or drop), cancel, purge and delete, spread over
//! several connections, checked step by step against a reference model of what every queue
//! holds and what every consumer must receive.
//!
//! Every operation is made deterministic before the next starts: publishes wait for their
//! confirm (the owning shard has the message), and whenever the model says a consumer must
//! receive a message, the test waits for exactly that message. Replayable from the seed printed
//! on failure.

mod common;

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use amqprs::channel::{
    BasicAckArguments, BasicCancelArguments, BasicConsumeArguments, BasicGetArguments,
    BasicPublishArguments, BasicQosArguments, BasicRejectArguments, Channel,
    ConfirmSelectArguments, ConsumerMessage, QueueBindArguments, QueueDeclareArguments,
    QueueDeleteArguments, QueuePurgeArguments, QueueUnbindArguments,
};
use amqprs::connection::Connection;
use amqprs::BasicProperties;
use common::{guest, Broker, ChannelRecorder, BALANCED};
use tokio::sync::mpsc::UnboundedReceiver;

const QUEUES: [&str; 4] = ["m0", "m1", "m2", "m3"];
const EXCHANGES: [&str; 3] = ["amq.direct", "amq.fanout", "amq.topic"];
const KEYS: [&str; 4] = ["a", "b", "a.b", "b.c"];
const TOPIC_PATTERNS: [&str; 4] = ["a", "*.b", "#", "b.*"];
const WAIT: Duration = Duration::from_secs(10);

/// xorshift64*: small, seedable, replayable.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545F4914F6CDD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[derive(Debug, Clone, PartialEq)]
struct ModelMessage {
    body: String,
    redelivered: bool,
}

#[derive(Debug, Default)]
struct ModelConsumer {
    /// The one message a prefetch-1 consumer holds, unacked.
    holding: Option<ModelMessage>,
}

#[derive(Debug, Default)]
struct ModelQueue {
    ready: VecDeque<ModelMessage>,
    consumer: Option<ModelConsumer>,
}

impl ModelQueue {
    /// A consumer with free credit takes the head, as the broker dispatches.
    fn dispatch(&mut self) {
        if let Some(consumer) = &mut self.consumer {
            if consumer.holding.is_none() {
                consumer.holding = self.ready.pop_front();
            }
        }
    }
}

fn topic_matches(pattern: &str, key: &str) -> bool {
    fn go(p: &[&str], k: &[&str]) -> bool {
        match p.split_first() {
            None => k.is_empty(),
            Some((&"#", rest)) => (0..=k.len()).any(|skip| go(rest, &k[skip..])),
            Some((&"*", rest)) => !k.is_empty() && go(rest, &k[1..]),
            Some((word, rest)) => k.first() == Some(word) && go(rest, &k[1..]),
        }
    }
    let p: Vec<&str> = pattern.split('.').collect();
    let k: Vec<&str> = key.split('.').collect();
    go(&p, &k)
}

#[derive(Default)]
struct Model {
    queues: BTreeMap<&'static str, ModelQueue>,
    /// (exchange, queue, key)
    bindings: Vec<(&'static str, &'static str, &'static str)>,
}

impl Model {
    fn route(&self, exchange: &str, key: &str) -> Vec<&'static str> {
        let mut out: Vec<&'static str> = self
            .bindings
            .iter()
            .filter(|(e, q, k)| {
                *e == exchange
                    && self.queues.contains_key(q)
                    && match exchange {
                        "amq.direct" => k == &key,
                        "amq.fanout" => true,
                        _ => topic_matches(k, key),
                    }
            })
            .map(|(_, q, _)| *q)
            .collect();
        out.sort();
        out.dedup();
        out
    }
}

struct Client {
    _connection: Connection,
    channel: Channel,
    recorder: ChannelRecorder,
    published: u64,
}

struct LiveConsumer {
    connection: Connection,
    channel: Channel,
    tag: String,
    rx: UnboundedReceiver<ConsumerMessage>,
    /// Delivery tag of the held message.
    held_tag: Option<u64>,
}

async fn client(broker: &Broker) -> Client {
    let connection = Connection::open(&guest(broker)).await.expect("connect");
    let channel = connection.open_channel(None).await.expect("channel");
    let recorder = ChannelRecorder::default();
    channel.register_callback(recorder.clone()).await.unwrap();
    channel
        .confirm_select(ConfirmSelectArguments::default())
        .await
        .unwrap();
    Client {
        _connection: connection,
        channel,
        recorder,
        published: 0,
    }
}

async fn receive(consumer: &mut LiveConsumer, expected: &ModelMessage, context: &str) {
    let message = tokio::time::timeout(WAIT, consumer.rx.recv())
        .await
        .unwrap_or_else(|_| panic!("{context}: no delivery of {expected:?}"))
        .expect("consumer open");
    let deliver = message.deliver.as_ref().unwrap();
    let body = String::from_utf8(message.content.clone().unwrap()).unwrap();
    assert_eq!(
        ModelMessage {
            body,
            redelivered: deliver.redelivered()
        },
        *expected,
        "{context}"
    );
    consumer.held_tag = Some(deliver.delivery_tag());
}

async fn run(seed: u64, steps: usize) {
    let broker = Broker::start_with_config(BALANCED);
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(client(&broker).await);
    }
    let mut rng = Rng(seed | 1);
    let mut model = Model::default();
    let mut consumers: BTreeMap<&'static str, LiveConsumer> = BTreeMap::new();
    let mut counter = 0u64;
    // How often each kind of operation actually ran (its precondition held).
    let mut ran = [0usize; 12];

    for step in 0..steps {
        let c = rng.below(clients.len());
        let queue = QUEUES[rng.below(QUEUES.len())];
        let context = format!("seed {seed} step {step}");
        let kind = rng.below(12);
        let applicable = match kind {
            1 | 2 | 6 | 10 => model.queues.contains_key(queue),
            7 => model.queues.contains_key(queue) && !consumers.contains_key(queue),
            8 | 9 => consumers.contains_key(queue),
            11 => model.queues.contains_key(queue),
            _ => true,
        };
        if applicable {
            ran[kind] += 1;
        }
        match kind {
            0 => {
                clients[c]
                    .channel
                    .queue_declare(QueueDeclareArguments::new(queue))
                    .await
                    .unwrap();
                model.queues.entry(queue).or_default();
            }
            1 | 2 if model.queues.contains_key(queue) => {
                let exchange = EXCHANGES[rng.below(EXCHANGES.len())];
                let key = if exchange == "amq.topic" {
                    TOPIC_PATTERNS[rng.below(TOPIC_PATTERNS.len())]
                } else {
                    KEYS[rng.below(KEYS.len())]
                };
                let binding = (exchange, queue, key);
                if model.bindings.contains(&binding) && rng.below(2) == 0 {
                    clients[c]
                        .channel
                        .queue_unbind(QueueUnbindArguments::new(queue, exchange, key))
                        .await
                        .unwrap();
                    model.bindings.retain(|b| *b != binding);
                } else {
                    clients[c]
                        .channel
                        .queue_bind(QueueBindArguments::new(queue, exchange, key))
                        .await
                        .unwrap();
                    if !model.bindings.contains(&binding) {
                        model.bindings.push(binding);
                    }
                }
            }
            3..=5 => {
                counter += 1;
                let body = format!("msg-{counter}");
                let (exchange, key) = if rng.below(3) == 0 {
                    ("", queue)
                } else {
                    (
                        EXCHANGES[rng.below(EXCHANGES.len())],
                        KEYS[rng.below(KEYS.len())],
                    )
                };
                let client = &mut clients[c];
                client
                    .channel
                    .basic_publish(
                        BasicProperties::default(),
                        body.clone().into_bytes(),
                        BasicPublishArguments::new(exchange, key),
                    )
                    .await
                    .unwrap();
                client.published += 1;
                let published = client.published;
                client
                    .recorder
                    .wait_for("the confirm", |r| r.confirmed_up_to() >= published)
                    .await;
                let targets = if exchange.is_empty() {
                    if model.queues.contains_key(queue) {
                        vec![queue]
                    } else {
                        vec![]
                    }
                } else {
                    model.route(exchange, key)
                };
                for target in targets {
                    let q = model.queues.get_mut(target).unwrap();
                    let was_idle = q.consumer.as_ref().is_some_and(|c| c.holding.is_none());
                    q.ready.push_back(ModelMessage {
                        body: body.clone(),
                        redelivered: false,
                    });
                    q.dispatch();
                    if was_idle {
                        let expected = q.consumer.as_ref().unwrap().holding.clone().unwrap();
                        receive(consumers.get_mut(target).unwrap(), &expected, &context).await;
                    }
                }
            }
            6 if model.queues.contains_key(queue) => {
                let mode = rng.below(3);
                let q = model.queues.get_mut(queue).unwrap();
                let got = clients[c]
                    .channel
                    .basic_get(BasicGetArguments::new(queue))
                    .await
                    .unwrap();
                let expected = q.ready.pop_front();
                match (got, expected) {
                    (None, None) => {}
                    (Some((get_ok, _, content)), Some(mut expected)) => {
                        let body = String::from_utf8(content).unwrap();
                        assert_eq!(
                            ModelMessage {
                                body,
                                redelivered: get_ok.redelivered()
                            },
                            expected,
                            "{context}: get"
                        );
                        assert_eq!(get_ok.message_count() as usize, q.ready.len(), "{context}");
                        let channel = &clients[c].channel;
                        match mode {
                            0 => channel
                                .basic_ack(BasicAckArguments::new(get_ok.delivery_tag(), false))
                                .await
                                .unwrap(),
                            1 => {
                                channel
                                    .basic_reject(BasicRejectArguments::new(
                                        get_ok.delivery_tag(),
                                        true,
                                    ))
                                    .await
                                    .unwrap();
                                expected.redelivered = true;
                                q.ready.push_front(expected);
                                let was_idle =
                                    q.consumer.as_ref().is_some_and(|c| c.holding.is_none());
                                q.dispatch();
                                if was_idle {
                                    let held =
                                        q.consumer.as_ref().unwrap().holding.clone().unwrap();
                                    receive(consumers.get_mut(queue).unwrap(), &held, &context)
                                        .await;
                                }
                            }
                            _ => channel
                                .basic_reject(BasicRejectArguments::new(
                                    get_ok.delivery_tag(),
                                    false,
                                ))
                                .await
                                .unwrap(),
                        }
                    }
                    (got, expected) => panic!(
                        "{context}: get returned {:?}, model expected {expected:?}",
                        got.map(|(_, _, c)| String::from_utf8(c).unwrap())
                    ),
                }
                // A settled get must reach the owner before anything else looks at the queue.
                let (_, _, _) = clients[c]
                    .channel
                    .queue_declare({
                        let mut args = QueueDeclareArguments::new(queue);
                        args.passive(true);
                        args
                    })
                    .await
                    .unwrap()
                    .unwrap();
            }
            7 if model.queues.contains_key(queue) && !consumers.contains_key(queue) => {
                let connection = Connection::open(&guest(&broker)).await.unwrap();
                let channel = connection.open_channel(None).await.unwrap();
                channel
                    .basic_qos(BasicQosArguments::new(0, 1, false))
                    .await
                    .unwrap();
                let (tag, rx) = channel
                    .basic_consume_rx(BasicConsumeArguments::new(queue, ""))
                    .await
                    .unwrap();
                let mut live = LiveConsumer {
                    connection,
                    channel,
                    tag,
                    rx,
                    held_tag: None,
                };
                let q = model.queues.get_mut(queue).unwrap();
                q.consumer = Some(ModelConsumer::default());
                q.dispatch();
                if let Some(expected) = q.consumer.as_ref().unwrap().holding.clone() {
                    receive(&mut live, &expected, &context).await;
                }
                consumers.insert(queue, live);
            }
            8 if consumers.contains_key(queue) => {
                let q = model.queues.get_mut(queue).unwrap();
                let consumer = q.consumer.as_mut().unwrap();
                if consumer.holding.take().is_some() {
                    let live = consumers.get_mut(queue).unwrap();
                    let tag = live.held_tag.take().unwrap();
                    live.channel
                        .basic_ack(BasicAckArguments::new(tag, false))
                        .await
                        .unwrap();
                    q.dispatch();
                    if let Some(expected) = q.consumer.as_ref().unwrap().holding.clone() {
                        receive(live, &expected, &context).await;
                    }
                }
            }
            9 if consumers.contains_key(queue) => {
                // Cancel and close: the held message goes back to the head, redelivered.
                let live = consumers.remove(queue).unwrap();
                live.channel
                    .basic_cancel(BasicCancelArguments::new(&live.tag))
                    .await
                    .unwrap();
                live.channel.close().await.unwrap();
                live.connection.close().await.unwrap();
                let q = model.queues.get_mut(queue).unwrap();
                if let Some(mut held) = q.consumer.take().unwrap().holding {
                    held.redelivered = true;
                    q.ready.push_front(held);
                }
                // Wait until the requeue landed.
                let mut passive = QueueDeclareArguments::new(queue);
                passive.passive(true);
                let expected = (q.ready.len() as u32, 0u32);
                let mut seen = (0, 0);
                for _ in 0..200 {
                    let (_, messages, consumer_count) = clients[c]
                        .channel
                        .queue_declare(passive.clone())
                        .await
                        .unwrap()
                        .unwrap();
                    seen = (messages, consumer_count);
                    if seen == expected {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                assert_eq!(seen, expected, "{context}: after cancel");
            }
            10 if model.queues.contains_key(queue) => {
                let purged = clients[c]
                    .channel
                    .queue_purge(QueuePurgeArguments::new(queue))
                    .await
                    .unwrap()
                    .unwrap();
                let q = model.queues.get_mut(queue).unwrap();
                assert_eq!(purged as usize, q.ready.len(), "{context}: purge count");
                q.ready.clear();
            }
            11 if model.queues.contains_key(queue) => {
                let count = clients[c]
                    .channel
                    .queue_delete(QueueDeleteArguments::new(queue))
                    .await
                    .unwrap()
                    .unwrap();
                let q = model.queues.remove(queue).unwrap();
                assert_eq!(count as usize, q.ready.len(), "{context}: delete count");
                model.bindings.retain(|(_, q, _)| *q != queue);
                if let Some(live) = consumers.remove(queue) {
                    let _ = live.connection.close().await;
                }
            }
            _ => {}
        }
        // Every few steps, every queue's ready count and consumer count match the model.
        if step % 10 == 9 {
            for (name, q) in &model.queues {
                let mut passive = QueueDeclareArguments::new(name);
                passive.passive(true);
                let (_, messages, consumer_count) = clients[0]
                    .channel
                    .queue_declare(passive)
                    .await
                    .unwrap()
                    .unwrap();
                assert_eq!(
                    (messages as usize, consumer_count as usize),
                    (q.ready.len(), usize::from(q.consumer.is_some())),
                    "{context}: counts of {name}"
                );
            }
        }
    }
    assert!(
        ran.iter().all(|n| *n > 0),
        "seed {seed}: some operations never ran: {ran:?}"
    );
}

#[tokio::test]
async fn random_operation_sequences_match_the_model() {
    let seeds: Vec<u64> = match std::env::var("SHARDMQ_MODEL_SEED") {
        Ok(seed) => vec![seed.parse().expect("a number")],
        Err(_) => vec![1, 2, 3, 0x5eed],
    };
    for seed in seeds {
        run(seed, 400).await;
    }
}
