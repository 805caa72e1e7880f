//! The durable metadata log: durable exchanges, durable queues (with their owning shard) and the
//! bindings between durable ends, as the coordinator changes them.
//!
//! Files: `data_dir/meta-<generation>.log`, framed with `shards::record`. At start-up every
//! generation is replayed in order (before any shard replays its messages); then the coordinator
//! writes a new generation holding only the current state and deletes the old ones. Payloads
//! (little-endian; `short` is u8-length bytes, `table` an AMQP field table with its u32 length):
//!
//! | kind | record          | payload                                                       |
//! |------|-----------------|---------------------------------------------------------------|
//! | 10   | Header          | u32 shard count                                               |
//! | 11   | DeclareExchange | short vhost, short name, u8 type, u8 flags, table arguments   |
//! | 12   | DeleteExchange  | short vhost, short name                                       |
//! | 13   | Bind            | short vhost, short source, u8 destination kind, short         |
//! |      |                 | destination, short routing key, table arguments               |
//! | 14   | Unbind          | as Bind                                                       |
//! | 15   | DeclareQueue    | short vhost, short name, u32 owner shard, u8 flags, table args|
//! | 16   | DeleteQueue     | short vhost, short name                                       |
//!
//! Exchange flags: bit 0 durable, bit 1 auto-delete, bit 2 internal. Queue flags: bit 0 durable,
//! bit 1 auto-delete. Destination kind: 0 queue, 1 exchange.

use std::path::{Path, PathBuf};

use ahash::HashMap;
use bytes::{BufMut, Bytes, BytesMut};
use log::{info, warn};
use shards::record::{put_short, replay, Malformed, PayloadReader, Record};
use shards::ShardId;

use super::routing::{
    BindingDef, Destination, ExchangeDef, ExchangeKind, MetaOp, QueueDef, VhostRouting,
};
use crate::codec::{write_table, FieldTable, Reader, ShortStr};

const KIND_HEADER: u8 = 10;
const KIND_DECLARE_EXCHANGE: u8 = 11;
const KIND_DELETE_EXCHANGE: u8 = 12;
const KIND_BIND: u8 = 13;
const KIND_UNBIND: u8 = 14;
const KIND_DECLARE_QUEUE: u8 = 15;
const KIND_DELETE_QUEUE: u8 = 16;

/// The durable metadata found at start-up, as ops to apply in order on every shard.
#[derive(Debug, Default, Clone)]
pub struct DurableMetadata {
    /// The shard count the data was written with, if any was.
    pub shard_count: Option<usize>,
    pub ops: Vec<(ShortStr, MetaOp)>,
    /// Generation files replayed (to delete once a new one is written).
    pub files: Vec<PathBuf>,
    pub next_generation: u64,
}

fn short(value: &ShortStr) -> &[u8] {
    value.as_bytes()
}

fn table_bytes(out: &mut BytesMut, table: &FieldTable) {
    write_table(out, table);
}

/// Encodes one change into `payload`; returns its record kind.
pub fn encode(vhost: &ShortStr, op: &MetaOp, payload: &mut BytesMut) -> u8 {
    put_short(payload, short(vhost));
    match op {
        MetaOp::DeclareExchange(def) => {
            put_short(payload, short(&def.name));
            payload.put_u8(match def.kind {
                ExchangeKind::Direct => 0,
                ExchangeKind::Fanout => 1,
                ExchangeKind::Topic => 2,
                ExchangeKind::Headers => 3,
            });
            payload.put_u8(
                u8::from(def.durable)
                    | u8::from(def.auto_delete) << 1
                    | u8::from(def.internal) << 2,
            );
            table_bytes(payload, &def.arguments);
            KIND_DECLARE_EXCHANGE
        }
        MetaOp::DeleteExchange { name } => {
            put_short(payload, short(name));
            KIND_DELETE_EXCHANGE
        }
        MetaOp::Bind(binding) | MetaOp::Unbind(binding) => {
            put_short(payload, short(&binding.source));
            let (kind, destination) = match &binding.destination {
                Destination::Queue(name) => (0, name),
                Destination::Exchange(name) => (1, name),
            };
            payload.put_u8(kind);
            put_short(payload, short(destination));
            put_short(payload, short(&binding.routing_key));
            table_bytes(payload, &binding.arguments);
            if matches!(op, MetaOp::Bind(_)) {
                KIND_BIND
            } else {
                KIND_UNBIND
            }
        }
        MetaOp::DeclareQueue(def) => {
            put_short(payload, short(&def.name));
            payload.put_u32_le(def.owner.index() as u32);
            payload.put_u8(u8::from(def.durable) | u8::from(def.auto_delete) << 1);
            table_bytes(payload, &def.arguments);
            KIND_DECLARE_QUEUE
        }
        MetaOp::DeleteQueue { name } => {
            put_short(payload, short(name));
            KIND_DELETE_QUEUE
        }
    }
}

pub fn encode_header(shard_count: usize, payload: &mut BytesMut) -> u8 {
    payload.put_u32_le(shard_count as u32);
    KIND_HEADER
}

fn name(reader: &mut PayloadReader) -> Result<ShortStr, Malformed> {
    ShortStr::from_bytes(reader.short()?).map_err(|_| Malformed("name"))
}

fn table(reader: &mut PayloadReader) -> Result<FieldTable, Malformed> {
    // The table runs to the end of the payload: it is always the last field.
    let rest = reader.rest();
    let mut table_reader = Reader::new(&rest);
    let table = table_reader.table().map_err(|_| Malformed("table"))?;
    if table_reader.remaining() != 0 {
        return Err(Malformed("trailing bytes"));
    }
    Ok(table)
}

enum Decoded {
    Header(usize),
    Op(ShortStr, MetaOp),
}

fn decode(record: &Record) -> Result<Decoded, Malformed> {
    let mut reader = PayloadReader::new(record.payload.clone());
    if record.kind == KIND_HEADER {
        return Ok(Decoded::Header(reader.u32()? as usize));
    }
    let vhost = name(&mut reader)?;
    let op = match record.kind {
        KIND_DECLARE_EXCHANGE => {
            let name = name(&mut reader)?;
            let kind = match reader.u8()? {
                0 => ExchangeKind::Direct,
                1 => ExchangeKind::Fanout,
                2 => ExchangeKind::Topic,
                3 => ExchangeKind::Headers,
                _ => return Err(Malformed("exchange type")),
            };
            let flags = reader.u8()?;
            MetaOp::DeclareExchange(ExchangeDef {
                name,
                kind,
                durable: flags & 1 != 0,
                auto_delete: flags & 2 != 0,
                internal: flags & 4 != 0,
                arguments: table(&mut reader)?,
            })
        }
        KIND_DELETE_EXCHANGE => MetaOp::DeleteExchange {
            name: name(&mut reader)?,
        },
        KIND_BIND | KIND_UNBIND => {
            let source = name(&mut reader)?;
            let destination = match reader.u8()? {
                0 => Destination::Queue(name(&mut reader)?),
                1 => Destination::Exchange(name(&mut reader)?),
                _ => return Err(Malformed("destination kind")),
            };
            let binding = BindingDef {
                source,
                destination,
                routing_key: name(&mut reader)?,
                arguments: table(&mut reader)?,
            };
            if record.kind == KIND_BIND {
                MetaOp::Bind(binding)
            } else {
                MetaOp::Unbind(binding)
            }
        }
        KIND_DECLARE_QUEUE => {
            let name = name(&mut reader)?;
            let owner = ShardId(reader.u32()? as usize);
            let flags = reader.u8()?;
            MetaOp::DeclareQueue(QueueDef {
                name,
                owner,
                durable: flags & 1 != 0,
                exclusive: None,
                auto_delete: flags & 2 != 0,
                arguments: table(&mut reader)?,
            })
        }
        KIND_DELETE_QUEUE => MetaOp::DeleteQueue {
            name: name(&mut reader)?,
        },
        _ => return Err(Malformed("record kind")),
    };
    Ok(Decoded::Op(vhost, op))
}

/// Log files of one kind in `dir`, oldest generation first: `<prefix>-<generation>.log`.
pub fn generations(dir: &Path, prefix: &str) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let mut found = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(found),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let file_name = entry.file_name();
        let Some(file_name) = file_name.to_str() else {
            continue;
        };
        let generation = file_name
            .strip_prefix(prefix)
            .and_then(|rest| rest.strip_prefix('-'))
            .and_then(|rest| rest.strip_suffix(".log"))
            .and_then(|number| number.parse::<u64>().ok());
        if let Some(generation) = generation {
            found.push((generation, entry.path()));
        }
    }
    found.sort();
    Ok(found)
}

/// Replays every metadata generation in `data_dir` (blocking reads: start-up only) and returns
/// the durable state as ops, in an order that recreates it.
pub fn recover(data_dir: &Path, vhosts: &[String]) -> std::io::Result<DurableMetadata> {
    let files = generations(data_dir, "meta")?;
    let mut routing: HashMap<ShortStr, VhostRouting> = HashMap::default();
    let mut shard_count = None;
    let mut records = 0usize;
    for (_, path) in &files {
        let image = Bytes::from(std::fs::read(path)?);
        let replayed = replay(image);
        if replayed.dropped_bytes > 0 {
            warn!(
                "{}: dropped a damaged tail of {} bytes after {} intact bytes ({})",
                path.display(),
                replayed.dropped_bytes,
                replayed.valid_bytes,
                replayed.stopped_by.unwrap_or("unknown")
            );
        }
        for record in &replayed.records {
            match decode(record) {
                Ok(Decoded::Header(count)) => shard_count = Some(count),
                Ok(Decoded::Op(vhost, op)) => {
                    records += 1;
                    routing
                        .entry(vhost.clone())
                        .or_insert_with(|| VhostRouting::new(vhost))
                        .apply(&op);
                }
                Err(Malformed(what)) => {
                    warn!(
                        "{}: malformed record at offset {} ({what}); ignoring the rest",
                        path.display(),
                        record.offset
                    );
                    break;
                }
            }
        }
    }
    let mut ops = Vec::new();
    let mut names: Vec<&ShortStr> = routing.keys().collect();
    names.sort();
    for vhost in names {
        if !vhosts.iter().any(|v| v.as_bytes() == vhost.as_bytes()) {
            warn!("metadata for vhost '{vhost}', which is not configured, is ignored");
            continue;
        }
        ops.extend(
            durable_ops(&routing[vhost])
                .into_iter()
                .map(|op| (vhost.clone(), op)),
        );
    }
    let next_generation = files.last().map_or(1, |(generation, _)| generation + 1);
    if !files.is_empty() {
        info!(
            "metadata: {records} records replayed from {} files; {} durable entities",
            files.len(),
            ops.len()
        );
    }
    Ok(DurableMetadata {
        shard_count,
        ops,
        files: files.into_iter().map(|(_, path)| path).collect(),
        next_generation,
    })
}

/// The durable part of a routing table, as ops: exchanges, then queues, then bindings.
pub fn durable_ops(routing: &VhostRouting) -> Vec<MetaOp> {
    let predeclared: Vec<ShortStr> = super::routing::predeclared_exchanges()
        .into_iter()
        .map(|def| def.name)
        .collect();
    let mut exchanges: Vec<&ExchangeDef> = routing
        .exchanges()
        .filter(|def| def.durable && !predeclared.contains(&def.name))
        .collect();
    exchanges.sort_by(|a, b| a.name.cmp(&b.name));
    let mut queues: Vec<&QueueDef> = routing
        .queues()
        .filter(|def| def.durable && def.exclusive.is_none())
        .collect();
    queues.sort_by(|a, b| a.name.cmp(&b.name));
    let mut ops: Vec<MetaOp> = exchanges
        .into_iter()
        .map(|def| MetaOp::DeclareExchange(def.clone()))
        .chain(
            queues
                .into_iter()
                .map(|def| MetaOp::DeclareQueue(def.clone())),
        )
        .collect();
    for binding in routing.bindings() {
        if is_durable_binding(routing, &binding) {
            ops.push(MetaOp::Bind(binding));
        }
    }
    ops
}

/// RabbitMQ keeps a binding across restarts when both of its ends are durable.
pub fn is_durable_binding(routing: &VhostRouting, binding: &BindingDef) -> bool {
    let source = routing.exchange(&binding.source).is_some_and(|e| e.durable);
    let destination = match &binding.destination {
        Destination::Queue(name) => routing
            .queue(name)
            .is_some_and(|q| q.durable && q.exclusive.is_none()),
        Destination::Exchange(name) => routing.exchange(name).is_some_and(|e| e.durable),
    };
    source && destination
}

/// Whether the coordinator must log `op` (given the routing table before it is applied).
pub fn is_logged(routing: &VhostRouting, op: &MetaOp) -> bool {
    match op {
        MetaOp::DeclareExchange(def) => def.durable,
        MetaOp::DeclareQueue(def) => def.durable && def.exclusive.is_none(),
        MetaOp::Bind(binding) => is_durable_binding(routing, binding),
        // Deleting what was never logged is harmless to log; deleting what was must be.
        MetaOp::DeleteExchange { name } => routing.exchange(name).is_some_and(|e| e.durable),
        MetaOp::DeleteQueue { name } => routing.queue(name).is_some_and(|q| q.durable),
        MetaOp::Unbind(binding) => is_durable_binding(routing, binding),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::FieldValue;
    use shards::record::encode_record;

    fn s(text: &str) -> ShortStr {
        ShortStr::try_from(text).unwrap()
    }

    fn write(path: &Path, header: Option<usize>, ops: &[MetaOp]) {
        let mut out = BytesMut::new();
        if let Some(count) = header {
            let mut payload = BytesMut::new();
            let kind = encode_header(count, &mut payload);
            encode_record(&mut out, kind, &payload);
        }
        for op in ops {
            let mut payload = BytesMut::new();
            let kind = encode(&s("/"), op, &mut payload);
            encode_record(&mut out, kind, &payload);
        }
        std::fs::write(path, out).unwrap();
    }

    fn exchange(name: &str, durable: bool) -> MetaOp {
        let mut arguments = FieldTable::new();
        arguments.insert(s("alternate-exchange"), FieldValue::LongStr("ae".into()));
        MetaOp::DeclareExchange(ExchangeDef {
            name: s(name),
            kind: ExchangeKind::Topic,
            durable,
            auto_delete: false,
            internal: true,
            arguments,
        })
    }

    fn queue(name: &str, durable: bool, owner: usize) -> MetaOp {
        MetaOp::DeclareQueue(QueueDef {
            name: s(name),
            owner: ShardId(owner),
            durable,
            exclusive: None,
            auto_delete: false,
            arguments: FieldTable::new(),
        })
    }

    fn bind(source: &str, queue: &str) -> MetaOp {
        MetaOp::Bind(BindingDef {
            source: s(source),
            destination: Destination::Queue(s(queue)),
            routing_key: s("a.#"),
            arguments: FieldTable::new(),
        })
    }

    #[test]
    fn every_op_round_trips() {
        let ops = vec![
            exchange("x", true),
            queue("q", true, 1),
            bind("x", "q"),
            MetaOp::Unbind(match bind("x", "q") {
                MetaOp::Bind(b) => b,
                _ => unreachable!(),
            }),
            MetaOp::DeleteQueue { name: s("q") },
            MetaOp::DeleteExchange { name: s("x") },
        ];
        for op in ops {
            let mut payload = BytesMut::new();
            let kind = encode(&s("/"), &op, &mut payload);
            let record = Record {
                kind,
                payload: payload.freeze(),
                offset: 0,
            };
            match decode(&record).unwrap() {
                Decoded::Op(vhost, decoded) => {
                    assert_eq!(vhost, s("/"));
                    assert_eq!(decoded, op);
                }
                Decoded::Header(_) => panic!("not a header"),
            }
        }
    }

    #[test]
    fn recovery_keeps_durable_state_across_generations() {
        let dir = tempfile::tempdir().unwrap();
        write(
            &dir.path().join("meta-1.log"),
            Some(2),
            &[
                exchange("x", true),
                queue("q", true, 1),
                queue("gone", true, 0),
                bind("x", "q"),
                bind("x", "gone"),
            ],
        );
        write(
            &dir.path().join("meta-2.log"),
            None,
            &[MetaOp::DeleteQueue { name: s("gone") }],
        );
        let recovered = recover(dir.path(), &["/".to_string()]).unwrap();
        assert_eq!(recovered.shard_count, Some(2));
        assert_eq!(recovered.next_generation, 3);
        let ops: Vec<MetaOp> = recovered.ops.into_iter().map(|(_, op)| op).collect();
        assert_eq!(
            ops,
            vec![exchange("x", true), queue("q", true, 1), bind("x", "q")]
        );
    }

    #[test]
    fn a_damaged_tail_is_dropped_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta-1.log");
        write(&path, Some(1), &[queue("q", true, 0), queue("r", true, 0)]);
        let mut bytes = std::fs::read(&path).unwrap();
        let len = bytes.len();
        bytes.truncate(len - 3);
        std::fs::write(&path, bytes).unwrap();
        let recovered = recover(dir.path(), &["/".to_string()]).unwrap();
        assert_eq!(recovered.ops.len(), 1);
    }
}
