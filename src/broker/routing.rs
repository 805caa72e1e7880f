//! The routing table of one vhost: exchanges, their bindings, and the queues they can reach.
//!
//! Every shard holds its own copy and routes its connections' publishes locally. Copies stay
//! identical because every change is a [`MetaOp`] that the coordinator validates once and every
//! shard then applies in the same order with [`VhostRouting::apply`], which is deterministic and
//! cannot fail.
//!
//! Routing follows exchange-to-exchange bindings (each exchange visited once, so cycles end) and
//! an exchange's alternate exchange when the exchange itself matched nothing.

use ahash::{HashMap, HashMapExt};
use shards::ShardId;

use super::messages::QueueKey;
use super::topic::TopicTrie;
use crate::codec::{FieldTable, FieldValue, ShortStr};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExchangeKind {
    Direct,
    Fanout,
    Topic,
    Headers,
}

impl ExchangeKind {
    pub fn parse(name: &[u8]) -> Option<ExchangeKind> {
        match name {
            b"direct" => Some(ExchangeKind::Direct),
            b"fanout" => Some(ExchangeKind::Fanout),
            b"topic" => Some(ExchangeKind::Topic),
            b"headers" => Some(ExchangeKind::Headers),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ExchangeKind::Direct => "direct",
            ExchangeKind::Fanout => "fanout",
            ExchangeKind::Topic => "topic",
            ExchangeKind::Headers => "headers",
        }
    }
}

/// Where a binding leads.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Destination {
    Queue(ShortStr),
    Exchange(ShortStr),
}

#[derive(Debug, Clone, PartialEq)]
pub struct ExchangeDef {
    pub name: ShortStr,
    pub kind: ExchangeKind,
    pub durable: bool,
    pub auto_delete: bool,
    pub internal: bool,
    pub arguments: FieldTable,
}

impl ExchangeDef {
    pub fn alternate_exchange(&self) -> Option<ShortStr> {
        match self.arguments.get("alternate-exchange")? {
            FieldValue::LongStr(name) => ShortStr::from_bytes(name.bytes().clone()).ok(),
            _ => None,
        }
    }

    /// RabbitMQ's equivalence rule for a redeclare: same type, flags and arguments.
    pub fn is_equivalent(&self, other: &ExchangeDef) -> bool {
        self.kind == other.kind
            && self.durable == other.durable
            && self.auto_delete == other.auto_delete
            && self.internal == other.internal
            && tables_equivalent(&self.arguments, &other.arguments)
    }
}

/// Same entries, in any order.
pub fn tables_equivalent(a: &FieldTable, b: &FieldTable) -> bool {
    a.len() == b.len()
        && a.iter()
            .all(|(name, value)| b.get_bytes(name.as_bytes()) == Some(value))
}

/// Who owns an exclusive queue: a connection on a shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnectionRef {
    pub shard: ShardId,
    pub connection: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct QueueDef {
    pub name: ShortStr,
    pub owner: ShardId,
    pub durable: bool,
    pub exclusive: Option<ConnectionRef>,
    pub auto_delete: bool,
    pub arguments: FieldTable,
}

impl QueueDef {
    pub fn is_equivalent(&self, durable: bool, auto_delete: bool, arguments: &FieldTable) -> bool {
        self.durable == durable
            && self.auto_delete == auto_delete
            && tables_equivalent(&self.arguments, arguments)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct BindingDef {
    pub source: ShortStr,
    pub destination: Destination,
    pub routing_key: ShortStr,
    pub arguments: FieldTable,
}

/// A change to a vhost's routing table, as the coordinator broadcasts it.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaOp {
    DeclareExchange(ExchangeDef),
    DeleteExchange { name: ShortStr },
    Bind(BindingDef),
    Unbind(BindingDef),
    DeclareQueue(QueueDef),
    DeleteQueue { name: ShortStr },
}

/// What a binding carries besides its destination, for exact removal.
#[derive(Debug, Clone, PartialEq)]
struct BindingEntry {
    destination: Destination,
    routing_key: ShortStr,
    arguments: FieldTable,
}

#[derive(Debug)]
enum BindingIndex {
    Direct(HashMap<ShortStr, Vec<BindingEntry>>),
    Fanout(Vec<BindingEntry>),
    Topic(TopicTrie<BindingEntry>),
    Headers(Vec<BindingEntry>),
}

#[derive(Debug)]
struct Exchange {
    def: ExchangeDef,
    /// `alternate-exchange` from the arguments, read once.
    alternate: Option<ShortStr>,
    bindings: BindingIndex,
    binding_count: usize,
}

impl Exchange {
    fn new(def: ExchangeDef) -> Exchange {
        let bindings = match def.kind {
            ExchangeKind::Direct => BindingIndex::Direct(HashMap::new()),
            ExchangeKind::Fanout => BindingIndex::Fanout(Vec::new()),
            ExchangeKind::Topic => BindingIndex::Topic(TopicTrie::default()),
            ExchangeKind::Headers => BindingIndex::Headers(Vec::new()),
        };
        Exchange {
            alternate: def.alternate_exchange(),
            def,
            bindings,
            binding_count: 0,
        }
    }

    fn add(&mut self, entry: BindingEntry) -> bool {
        let added = match &mut self.bindings {
            BindingIndex::Direct(map) => {
                let list = map.entry(entry.routing_key.clone()).or_default();
                !list.contains(&entry) && {
                    list.push(entry);
                    true
                }
            }
            BindingIndex::Fanout(list) | BindingIndex::Headers(list) => {
                !list.contains(&entry) && {
                    list.push(entry);
                    true
                }
            }
            BindingIndex::Topic(trie) => trie.insert(&entry.routing_key.clone(), entry),
        };
        self.binding_count += usize::from(added);
        added
    }

    fn remove(&mut self, entry: &BindingEntry) -> bool {
        let removed = match &mut self.bindings {
            BindingIndex::Direct(map) => match map.get_mut(&entry.routing_key) {
                Some(list) => {
                    let before = list.len();
                    list.retain(|e| e != entry);
                    let removed = list.len() != before;
                    if list.is_empty() {
                        map.remove(&entry.routing_key);
                    }
                    removed
                }
                None => false,
            },
            BindingIndex::Fanout(list) | BindingIndex::Headers(list) => {
                let before = list.len();
                list.retain(|e| e != entry);
                list.len() != before
            }
            BindingIndex::Topic(trie) => trie.remove(&entry.routing_key, entry),
        };
        self.binding_count -= usize::from(removed);
        removed
    }

    fn remove_destination(&mut self, destination: &Destination) -> usize {
        let removed = match &mut self.bindings {
            BindingIndex::Direct(map) => {
                let mut removed = 0;
                map.retain(|_, list| {
                    let before = list.len();
                    list.retain(|e| &e.destination != destination);
                    removed += before - list.len();
                    !list.is_empty()
                });
                removed
            }
            BindingIndex::Fanout(list) | BindingIndex::Headers(list) => {
                let before = list.len();
                list.retain(|e| &e.destination != destination);
                before - list.len()
            }
            BindingIndex::Topic(trie) => {
                trie.remove_where(&mut |e: &BindingEntry| &e.destination == destination)
            }
        };
        self.binding_count -= removed;
        removed
    }

    fn has_binding(&self, entry: &BindingEntry) -> bool {
        match &self.bindings {
            BindingIndex::Direct(map) => map
                .get(&entry.routing_key)
                .is_some_and(|list| list.contains(entry)),
            BindingIndex::Fanout(list) | BindingIndex::Headers(list) => list.contains(entry),
            BindingIndex::Topic(trie) => {
                let mut found = false;
                trie.for_each_match(entry.routing_key.as_bytes(), &mut |e| found |= e == entry);
                found
            }
        }
    }

    /// Calls `found` for every destination a message matches in this exchange alone (a
    /// destination bound twice is reported twice).
    fn for_each_match(
        &self,
        routing_key: &ShortStr,
        headers: Option<&FieldTable>,
        found: &mut impl FnMut(&Destination),
    ) {
        match &self.bindings {
            BindingIndex::Direct(map) => {
                if let Some(list) = map.get(routing_key) {
                    list.iter().for_each(|e| found(&e.destination));
                }
            }
            BindingIndex::Fanout(list) => list.iter().for_each(|e| found(&e.destination)),
            BindingIndex::Topic(trie) => trie
                .for_each_match(routing_key.as_bytes(), &mut |e: &BindingEntry| {
                    found(&e.destination)
                }),
            BindingIndex::Headers(list) => {
                let empty = FieldTable::new();
                let headers = headers.unwrap_or(&empty);
                list.iter()
                    .filter(|e| headers_match(&e.arguments, headers))
                    .for_each(|e| found(&e.destination));
            }
        }
    }
}

/// The headers exchange's rule: `x-match` of `all` (the default), `any`, `all-with-x` or
/// `any-with-x`; binding arguments starting with `x-` are ignored unless the mode ends with
/// `-with-x`. A binding argument of type void matches any value of a present header.
pub fn headers_match(binding: &FieldTable, headers: &FieldTable) -> bool {
    let mode = binding
        .get("x-match")
        .and_then(FieldValue::as_bytes)
        .unwrap_or(b"all");
    let (any, with_x) = match mode {
        b"any" => (true, false),
        b"any-with-x" => (true, true),
        b"all-with-x" => (false, true),
        _ => (false, false),
    };
    let mut considered = binding
        .iter()
        .filter(|(name, _)| name.as_bytes() != b"x-match")
        .filter(|(name, _)| with_x || !name.as_bytes().starts_with(b"x-"));
    let entry_matches =
        |(name, value): &(ShortStr, FieldValue)| match headers.get_bytes(name.as_bytes()) {
            Some(header) => *value == FieldValue::Void || header == value,
            None => false,
        };
    if any {
        considered.any(entry_matches)
    } else {
        considered.all(entry_matches)
    }
}

/// The exchanges RabbitMQ declares in every vhost.
pub fn predeclared_exchanges() -> Vec<ExchangeDef> {
    [
        ("amq.direct", ExchangeKind::Direct),
        ("amq.fanout", ExchangeKind::Fanout),
        ("amq.topic", ExchangeKind::Topic),
        ("amq.headers", ExchangeKind::Headers),
        ("amq.match", ExchangeKind::Headers),
    ]
    .into_iter()
    .map(|(name, kind)| ExchangeDef {
        name: ShortStr::from_static(name),
        kind,
        durable: true,
        auto_delete: false,
        internal: false,
        arguments: FieldTable::new(),
    })
    .collect()
}

/// One vhost's exchanges, bindings and queues.
#[derive(Debug)]
pub struct VhostRouting {
    vhost: ShortStr,
    exchanges: HashMap<ShortStr, Exchange>,
    queues: HashMap<ShortStr, RoutingQueue>,
}

/// A queue as routing knows it: its definition, and the handle publishes carry to its owner
/// (made once, when the queue is declared here).
#[derive(Debug)]
struct RoutingQueue {
    def: QueueDef,
    key: QueueKey,
}

/// At most this many exchanges are visited while routing one message (exchange-to-exchange
/// chains and alternate exchanges): a bound on the work one publish can cause.
pub const ROUTING_EXCHANGES_MAX: usize = 64;

impl VhostRouting {
    pub fn new(vhost: ShortStr) -> VhostRouting {
        let mut routing = VhostRouting {
            vhost,
            exchanges: HashMap::new(),
            queues: HashMap::new(),
        };
        for def in predeclared_exchanges() {
            routing
                .exchanges
                .insert(def.name.clone(), Exchange::new(def));
        }
        routing
    }

    pub fn exchange(&self, name: &ShortStr) -> Option<&ExchangeDef> {
        self.exchanges.get(name).map(|e| &e.def)
    }

    pub fn queue(&self, name: &ShortStr) -> Option<&QueueDef> {
        self.queues.get(name).map(|q| &q.def)
    }

    /// The handle of a declared queue (its owner keys the queue by the same one).
    pub fn queue_key(&self, name: &ShortStr) -> Option<&QueueKey> {
        self.queues.get(name).map(|q| &q.key)
    }

    pub fn queues(&self) -> impl Iterator<Item = &QueueDef> {
        self.queues.values().map(|q| &q.def)
    }

    pub fn exchanges(&self) -> impl Iterator<Item = &ExchangeDef> {
        self.exchanges.values().map(|e| &e.def)
    }

    /// Every binding, sorted (source, destination, key) so that the order is deterministic.
    pub fn bindings(&self) -> Vec<BindingDef> {
        let mut out = Vec::new();
        for exchange in self.exchanges.values() {
            let source = exchange.def.name.clone();
            let mut push = |entry: &BindingEntry| {
                out.push(BindingDef {
                    source: source.clone(),
                    destination: entry.destination.clone(),
                    routing_key: entry.routing_key.clone(),
                    arguments: entry.arguments.clone(),
                })
            };
            match &exchange.bindings {
                BindingIndex::Direct(map) => map.values().flatten().for_each(&mut push),
                BindingIndex::Fanout(list) | BindingIndex::Headers(list) => {
                    list.iter().for_each(&mut push)
                }
                BindingIndex::Topic(trie) => trie.for_each(&mut |_, entry| push(entry)),
            }
        }
        out.sort_by(|a, b| {
            (&a.source, destination_order(&a.destination), &a.routing_key).cmp(&(
                &b.source,
                destination_order(&b.destination),
                &b.routing_key,
            ))
        });
        out
    }

    pub fn has_binding(&self, binding: &BindingDef) -> bool {
        self.exchanges.get(&binding.source).is_some_and(|e| {
            e.has_binding(&BindingEntry {
                destination: binding.destination.clone(),
                routing_key: binding.routing_key.clone(),
                arguments: binding.arguments.clone(),
            })
        })
    }

    /// Whether `exchange` is the source of any binding (exchange.delete if-unused, as RabbitMQ
    /// checks it).
    pub fn exchange_has_bindings(&self, exchange: &ShortStr) -> bool {
        self.exchanges
            .get(exchange)
            .is_some_and(|e| e.binding_count > 0)
    }

    /// Applies a change the coordinator has validated. Deterministic: every shard ends in the
    /// same state. Deleting a queue or an exchange removes the bindings that mention it, and an
    /// auto-delete exchange goes once it is the source of no binding.
    pub fn apply(&mut self, op: &MetaOp) {
        match op {
            MetaOp::DeclareExchange(def) => {
                self.exchanges
                    .entry(def.name.clone())
                    .or_insert_with(|| Exchange::new(def.clone()));
            }
            MetaOp::DeleteExchange { name } => self.delete_exchange(name),
            MetaOp::Bind(binding) => {
                if let Some(exchange) = self.exchanges.get_mut(&binding.source) {
                    exchange.add(BindingEntry {
                        destination: binding.destination.clone(),
                        routing_key: binding.routing_key.clone(),
                        arguments: binding.arguments.clone(),
                    });
                }
            }
            MetaOp::Unbind(binding) => {
                if let Some(exchange) = self.exchanges.get_mut(&binding.source) {
                    exchange.remove(&BindingEntry {
                        destination: binding.destination.clone(),
                        routing_key: binding.routing_key.clone(),
                        arguments: binding.arguments.clone(),
                    });
                }
                self.auto_delete_unused(std::slice::from_ref(&binding.source));
            }
            MetaOp::DeclareQueue(def) => {
                self.queues
                    .entry(def.name.clone())
                    .or_insert_with(|| RoutingQueue {
                        def: def.clone(),
                        key: QueueKey::new(self.vhost.clone(), def.name.clone()),
                    });
            }
            MetaOp::DeleteQueue { name } => {
                if self.queues.remove(name).is_some() {
                    let affected = self.remove_destination(&Destination::Queue(name.clone()));
                    self.auto_delete_unused(&affected);
                }
            }
        }
    }

    fn delete_exchange(&mut self, name: &ShortStr) {
        if self.exchanges.remove(name).is_none() {
            return;
        }
        let affected = self.remove_destination(&Destination::Exchange(name.clone()));
        self.auto_delete_unused(&affected);
    }

    /// Removes every binding to `destination`; returns the exchanges that lost one.
    fn remove_destination(&mut self, destination: &Destination) -> Vec<ShortStr> {
        let mut affected: Vec<ShortStr> = self
            .exchanges
            .iter_mut()
            .filter_map(|(name, exchange)| {
                (exchange.remove_destination(destination) > 0).then(|| name.clone())
            })
            .collect();
        affected.sort();
        affected
    }

    fn auto_delete_unused(&mut self, candidates: &[ShortStr]) {
        for name in candidates {
            let unused = self
                .exchanges
                .get(name)
                .is_some_and(|e| e.def.auto_delete && e.binding_count == 0);
            if unused {
                self.delete_exchange(name);
            }
        }
    }

    /// The queues a message published to `exchange` reaches, with their owners, sorted by name
    /// and without duplicates. The default exchange (empty name) reaches the queue named by the
    /// routing key.
    pub fn route(
        &self,
        exchange: &ShortStr,
        routing_key: &ShortStr,
        headers: Option<&FieldTable>,
        out: &mut Vec<RoutedQueue>,
    ) {
        out.clear();
        if exchange.is_empty() {
            if let Some(queue) = self.queues.get(routing_key) {
                out.push(RoutedQueue::of(queue));
            }
            return;
        }
        let Some(first) = self.exchanges.get(exchange) else {
            return;
        };
        // Fast path: the exchange's own matches are all queues; no walk, no allocation but
        // the output.
        let mut matched_any = false;
        let mut leads_elsewhere = false;
        first.for_each_match(routing_key, headers, &mut |destination| {
            matched_any = true;
            match destination {
                Destination::Queue(name) => {
                    if let Some(queue) = self.queues.get(name) {
                        out.push(RoutedQueue::of(queue));
                    }
                }
                Destination::Exchange(_) => leads_elsewhere = true,
            }
        });
        if leads_elsewhere || (!matched_any && first.alternate.is_some()) {
            out.clear();
            self.route_through_exchanges(exchange, routing_key, headers, out);
        }
        if out.len() > 1 {
            out.sort_unstable_by(|a, b| a.key.cmp(&b.key));
            out.dedup_by(|a, b| a.key == b.key);
        }
    }

    /// The general walk: exchange-to-exchange bindings and alternate exchanges, each exchange
    /// visited once.
    fn route_through_exchanges(
        &self,
        exchange: &ShortStr,
        routing_key: &ShortStr,
        headers: Option<&FieldTable>,
        out: &mut Vec<RoutedQueue>,
    ) {
        let mut visited: Vec<&ShortStr> = Vec::new();
        let mut pending: Vec<&ShortStr> = vec![exchange];
        while let Some(name) = pending.pop() {
            if visited.contains(&name) || visited.len() >= ROUTING_EXCHANGES_MAX {
                continue;
            }
            visited.push(name);
            let Some(exchange) = self.exchanges.get(name) else {
                continue;
            };
            let mut matched_any = false;
            exchange.for_each_match(routing_key, headers, &mut |destination| {
                matched_any = true;
                match destination {
                    Destination::Queue(queue) => {
                        if let Some(queue) = self.queues.get(queue) {
                            out.push(RoutedQueue::of(queue));
                        }
                    }
                    Destination::Exchange(next) => {
                        if let Some((key, _)) = self.exchanges.get_key_value(next) {
                            pending.push(key);
                        }
                    }
                }
            });
            if !matched_any {
                if let Some(alternate) = &exchange.alternate {
                    pending.push(alternate);
                }
            }
        }
    }
}

fn destination_order(destination: &Destination) -> (u8, &ShortStr) {
    match destination {
        Destination::Queue(name) => (0, name),
        Destination::Exchange(name) => (1, name),
    }
}

/// A queue a message was routed to, and the shard that owns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutedQueue {
    pub key: QueueKey,
    pub owner: ShardId,
}

impl RoutedQueue {
    fn of(queue: &RoutingQueue) -> RoutedQueue {
        RoutedQueue {
            key: queue.key.clone(),
            owner: queue.def.owner,
        }
    }
}

#[cfg(test)]
mod tests;
