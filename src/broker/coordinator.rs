//! The coordinator of metadata changes (on shard 0).
//!
//! Declares, deletes, binds and unbinds from every connection on every shard are serialized here:
//! one request at a time, validated against shard 0's routing table with RabbitMQ's rules, then
//! applied on shard 0 and sent to every other shard as an `Apply`, and answered only once every
//! shard has applied it. So when a client gets declare-ok or bind-ok, a publish from any core
//! already routes with the change, and two connections declaring the same name at once resolve
//! to one entity (the second sees the first's and is checked for equivalence).

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;

use log::{debug, warn};
use shards::ShardId;

use super::messages::{MetaOutcome, MetaRequest, QueueKey, Reply, ShardMessage};
use super::routing::{
    tables_equivalent, BindingDef, ConnectionRef, Destination, ExchangeDef, MetaOp, QueueDef,
    VhostRouting,
};
use super::shard::{internal_error, ShardBroker};
use super::{queue_arguments, queue_policy};
use crate::codec::{FieldTable, ReplyCode, ShortStr};
use crate::connection::error::AmqpError;
use crate::runtime::sync::Notify;

struct Submitted {
    from: ShardId,
    token: u64,
    vhost: ShortStr,
    requester: ConnectionRef,
    request: MetaRequest,
}

pub struct Coordinator {
    requests: RefCell<VecDeque<Submitted>>,
    wake: Notify,
    names_generated: Cell<u64>,
    name_seed: ahash::RandomState,
}

fn refused(code: ReplyCode, detail: impl std::fmt::Display) -> AmqpError {
    AmqpError::channel(code, detail)
}

fn default_exchange_refused() -> AmqpError {
    refused(
        ReplyCode::AccessRefused,
        "operation not permitted on the default exchange",
    )
}

fn locked(name: &ShortStr, vhost: &ShortStr) -> AmqpError {
    refused(
        ReplyCode::ResourceLocked,
        format_args!(
            "cannot obtain exclusive access to locked queue '{name}' in vhost '{vhost}'. It could \
             be originally declared on another connection or the exclusive property value does \
             not match that of the original declaration."
        ),
    )
}

fn inequivalent(
    arg: &str,
    kind: &str,
    name: &ShortStr,
    vhost: &ShortStr,
    received: impl std::fmt::Display,
    current: impl std::fmt::Display,
) -> AmqpError {
    refused(
        ReplyCode::PreconditionFailed,
        format_args!(
            "inequivalent arg '{arg}' for {kind} '{name}' in vhost '{vhost}': received \
             '{received}' but current is '{current}'"
        ),
    )
}

/// Names the first argument that differs between two tables.
fn first_differing_argument(a: &FieldTable, b: &FieldTable) -> String {
    a.iter()
        .chain(b.iter())
        .find(|(name, _)| a.get_bytes(name.as_bytes()) != b.get_bytes(name.as_bytes()))
        .map(|(name, _)| name.to_string())
        .unwrap_or_else(|| "arguments".into())
}

impl Coordinator {
    pub fn new() -> Rc<Coordinator> {
        Rc::new(Coordinator {
            requests: RefCell::new(VecDeque::new()),
            wake: Notify::default(),
            names_generated: Cell::new(0),
            name_seed: ahash::RandomState::new(),
        })
    }

    pub fn start(self: &Rc<Self>, shard: Rc<ShardBroker>) {
        let coordinator = self.clone();
        glommio::spawn_local(async move { coordinator.run(shard).await }).detach();
    }

    pub fn submit(
        &self,
        from: ShardId,
        token: u64,
        vhost: ShortStr,
        requester: ConnectionRef,
        request: MetaRequest,
    ) {
        self.requests.borrow_mut().push_back(Submitted {
            from,
            token,
            vhost,
            requester,
            request,
        });
        self.wake.notify();
    }

    async fn run(self: Rc<Self>, shard: Rc<ShardBroker>) {
        loop {
            let next = self.requests.borrow_mut().pop_front();
            let Some(submitted) = next else {
                self.wake.wait().await;
                continue;
            };
            let result = self.process(&shard, &submitted).await;
            if submitted.token != 0 {
                shard.post(
                    submitted.from,
                    ShardMessage::Reply {
                        token: submitted.token,
                        reply: Reply::Meta(result),
                    },
                );
            }
        }
    }

    /// Logs `op` if it concerns durable entities (and waits for the disk), then applies it on
    /// this shard and on every other, and waits until all have.
    /// Fail-stop: if the metadata log cannot record the change, it is not applied and the
    /// client's connection is closed with 541 INTERNAL_ERROR.
    async fn apply_everywhere(
        &self,
        shard: &Rc<ShardBroker>,
        vhost: &ShortStr,
        op: MetaOp,
    ) -> Result<(), AmqpError> {
        if !shard.log_meta(vhost, &op).await {
            log::error!("metadata log failed: refusing metadata changes in vhost '{vhost}'");
            return Err(AmqpError::connection(
                ReplyCode::InternalError,
                "the metadata log cannot be written",
            ));
        }
        shard.apply_meta(vhost, &op);
        let replies: Vec<_> = (0..shard.shard_count())
            .map(ShardId)
            .filter(|id| *id != shard.id)
            .map(|id| {
                let (vhost, op) = (vhost.clone(), Box::new(op.clone()));
                shard.request(id, move |token| ShardMessage::Apply { token, vhost, op })
            })
            .collect();
        for reply in replies {
            let _ = reply.await;
        }
        Ok(())
    }

    fn generate_queue_name(&self, routing: &VhostRouting) -> ShortStr {
        const ALPHABET: &[u8; 64] =
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        loop {
            let n = self.names_generated.get();
            self.names_generated.set(n + 1);
            let high = self.name_seed.hash_one((n, 0u8));
            let low = self.name_seed.hash_one((n, 1u8));
            let bits = (u128::from(high) << 64) | u128::from(low);
            let mut name = String::from("amq.gen-");
            for i in 0..22 {
                name.push(ALPHABET[((bits >> (i * 6)) & 63) as usize] as char);
            }
            let name = ShortStr::try_from(name).unwrap_or_default();
            if routing.queue(&name).is_none() {
                return name;
            }
        }
    }

    async fn process(
        &self,
        shard: &Rc<ShardBroker>,
        submitted: &Submitted,
    ) -> Result<MetaOutcome, AmqpError> {
        let vhost = &submitted.vhost;
        let requester = submitted.requester;
        let exists = shard.with_routing(vhost, |_| ()).is_some();
        if !exists {
            return Err(AmqpError::connection(
                ReplyCode::NotAllowed,
                format_args!("vhost {vhost} not found"),
            ));
        }
        match &submitted.request {
            MetaRequest::DeclareExchange { def, passive } => {
                self.declare_exchange(shard, vhost, def, *passive).await
            }
            MetaRequest::DeleteExchange { name, if_unused } => {
                if name.is_empty() {
                    return Err(default_exchange_refused());
                }
                if name.as_bytes().starts_with(b"amq.") {
                    return Err(refused(
                        ReplyCode::AccessRefused,
                        format_args!("deletion of system exchange '{name}' in vhost '{vhost}' is not allowed"),
                    ));
                }
                let (exists, in_use) = shard
                    .with_routing(vhost, |r| {
                        (r.exchange(name).is_some(), r.exchange_has_bindings(name))
                    })
                    .unwrap_or((false, false));
                if !exists {
                    return Ok(MetaOutcome::Done);
                }
                if *if_unused && in_use {
                    return Err(refused(
                        ReplyCode::PreconditionFailed,
                        format_args!("exchange '{name}' in vhost '{vhost}' in use"),
                    ));
                }
                self.apply_everywhere(shard, vhost, MetaOp::DeleteExchange { name: name.clone() })
                    .await?;
                Ok(MetaOutcome::Done)
            }
            MetaRequest::Bind(binding) => self.bind(shard, vhost, requester, binding, true).await,
            MetaRequest::Unbind(binding) => {
                self.bind(shard, vhost, requester, binding, false).await
            }
            MetaRequest::DeclareQueue {
                name,
                passive,
                durable,
                exclusive,
                auto_delete,
                arguments,
            } => {
                if !*passive {
                    let (queue, vhost_name) = (name.to_str_lossy(), vhost.to_str_lossy());
                    if let Some(text) = queue_arguments::refusal(arguments, &queue, &vhost_name) {
                        return Err(refused(ReplyCode::PreconditionFailed, text));
                    }
                }
                let existing = shard
                    .with_routing(vhost, |r| r.queue(name).cloned())
                    .flatten();
                if let Some(def) = existing {
                    if def.exclusive.is_some_and(|owner| owner != requester)
                        || (!*passive && def.exclusive.is_some() != *exclusive)
                    {
                        return Err(locked(name, vhost));
                    }
                    if !*passive {
                        if def.durable != *durable {
                            return Err(inequivalent(
                                "durable",
                                "queue",
                                name,
                                vhost,
                                durable,
                                def.durable,
                            ));
                        }
                        if def.auto_delete != *auto_delete {
                            return Err(inequivalent(
                                "auto_delete",
                                "queue",
                                name,
                                vhost,
                                auto_delete,
                                def.auto_delete,
                            ));
                        }
                        if !tables_equivalent(&def.arguments, arguments) {
                            let arg = first_differing_argument(&def.arguments, arguments);
                            return Err(refused(
                                ReplyCode::PreconditionFailed,
                                format_args!(
                                    "inequivalent arg '{arg}' for queue '{name}' in vhost '{vhost}'"
                                ),
                            ));
                        }
                    }
                    return Ok(MetaOutcome::Queue {
                        name: def.name,
                        owner: def.owner,
                        created: false,
                    });
                }
                if *passive {
                    return Err(refused(
                        ReplyCode::NotFound,
                        format_args!("no queue '{name}' in vhost '{vhost}'"),
                    ));
                }
                if name.as_bytes().starts_with(b"amq.") {
                    return Err(refused(
                        ReplyCode::AccessRefused,
                        format_args!("queue name '{name}' contains reserved prefix 'amq.*'"),
                    ));
                }
                let name = if name.is_empty() {
                    shard
                        .with_routing(vhost, |r| self.generate_queue_name(r))
                        .unwrap_or_default()
                } else {
                    name.clone()
                };
                // An exclusive queue lives with its connection.
                let owner = if *exclusive {
                    requester.shard
                } else {
                    shard.place_queue(requester)
                };
                let def = QueueDef {
                    name: name.clone(),
                    owner,
                    durable: *durable,
                    exclusive: exclusive.then_some(requester),
                    auto_delete: *auto_delete,
                    arguments: arguments.clone(),
                };
                debug!("queue '{name}' in vhost '{vhost}' placed on {owner}");
                for (key, _) in arguments.iter() {
                    let key = key.to_str_lossy();
                    if key.starts_with("x-") && !queue_policy::APPLIED_ARGUMENTS.contains(&&*key) {
                        warn!(
                            "queue '{name}' in vhost '{vhost}': argument '{key}' is accepted \
                             but not applied"
                        );
                    }
                }
                self.apply_everywhere(shard, vhost, MetaOp::DeclareQueue(def))
                    .await?;
                Ok(MetaOutcome::Queue {
                    name,
                    owner,
                    created: true,
                })
            }
            MetaRequest::DeleteQueue {
                name,
                if_unused,
                if_empty,
            } => {
                let Some(def) = shard
                    .with_routing(vhost, |r| r.queue(name).cloned())
                    .flatten()
                else {
                    return Ok(MetaOutcome::Deleted { message_count: 0 });
                };
                if def.exclusive.is_some_and(|owner| owner != requester) {
                    return Err(locked(name, vhost));
                }
                let message_count = self
                    .delete_queue(shard, vhost, &def, *if_unused, *if_empty)
                    .await?;
                Ok(MetaOutcome::Deleted { message_count })
            }
            MetaRequest::DeleteUnusedQueue { name } => {
                if let Some(def) = shard
                    .with_routing(vhost, |r| r.queue(name).cloned())
                    .flatten()
                {
                    // Still unused? A new consumer may have arrived since the owner asked.
                    let _ = self.delete_queue(shard, vhost, &def, true, false).await;
                }
                Ok(MetaOutcome::Done)
            }
            MetaRequest::ConnectionClosed => {
                let exclusive: Vec<QueueDef> = shard
                    .with_routing(vhost, |r| {
                        r.queues()
                            .filter(|q| q.exclusive == Some(requester))
                            .cloned()
                            .collect()
                    })
                    .unwrap_or_default();
                for def in exclusive {
                    let _ = self.delete_queue(shard, vhost, &def, false, false).await;
                }
                Ok(MetaOutcome::Done)
            }
        }
    }

    async fn declare_exchange(
        &self,
        shard: &Rc<ShardBroker>,
        vhost: &ShortStr,
        def: &ExchangeDef,
        passive: bool,
    ) -> Result<MetaOutcome, AmqpError> {
        let name = &def.name;
        if name.is_empty() {
            return Err(default_exchange_refused());
        }
        let existing = shard
            .with_routing(vhost, |r| r.exchange(name).cloned())
            .flatten();
        match existing {
            Some(current) => {
                if passive || current.is_equivalent(def) {
                    return Ok(MetaOutcome::Done);
                }
                let (arg, received, now) = if current.kind != def.kind {
                    (
                        "type",
                        def.kind.name().to_string(),
                        current.kind.name().to_string(),
                    )
                } else if current.durable != def.durable {
                    (
                        "durable",
                        def.durable.to_string(),
                        current.durable.to_string(),
                    )
                } else if current.auto_delete != def.auto_delete {
                    (
                        "auto_delete",
                        def.auto_delete.to_string(),
                        current.auto_delete.to_string(),
                    )
                } else if current.internal != def.internal {
                    (
                        "internal",
                        def.internal.to_string(),
                        current.internal.to_string(),
                    )
                } else {
                    let arg = first_differing_argument(&current.arguments, &def.arguments);
                    return Err(refused(
                        ReplyCode::PreconditionFailed,
                        format_args!(
                            "inequivalent arg '{arg}' for exchange '{name}' in vhost '{vhost}'"
                        ),
                    ));
                };
                Err(inequivalent(arg, "exchange", name, vhost, received, now))
            }
            None if passive => Err(refused(
                ReplyCode::NotFound,
                format_args!("no exchange '{name}' in vhost '{vhost}'"),
            )),
            None => {
                if name.as_bytes().starts_with(b"amq.") {
                    return Err(refused(
                        ReplyCode::AccessRefused,
                        format_args!("exchange name '{name}' contains reserved prefix 'amq.*'"),
                    ));
                }
                self.apply_everywhere(shard, vhost, MetaOp::DeclareExchange(def.clone()))
                    .await?;
                Ok(MetaOutcome::Done)
            }
        }
    }

    async fn bind(
        &self,
        shard: &Rc<ShardBroker>,
        vhost: &ShortStr,
        requester: ConnectionRef,
        binding: &BindingDef,
        bind: bool,
    ) -> Result<MetaOutcome, AmqpError> {
        let destination_name = match &binding.destination {
            Destination::Queue(name) | Destination::Exchange(name) => name,
        };
        if binding.source.is_empty()
            || matches!(&binding.destination, Destination::Exchange(name) if name.is_empty())
        {
            return Err(default_exchange_refused());
        }
        let (source, destination, already) = shard
            .with_routing(vhost, |r| {
                let destination = match &binding.destination {
                    Destination::Queue(name) => r.queue(name).map(|q| q.exclusive),
                    Destination::Exchange(name) => r.exchange(name).map(|_| None),
                };
                (
                    r.exchange(&binding.source).is_some(),
                    destination,
                    r.has_binding(binding),
                )
            })
            .unwrap_or((false, None, false));
        if !bind && (!source || destination.is_none()) {
            return Ok(MetaOutcome::Done);
        }
        if !source {
            return Err(refused(
                ReplyCode::NotFound,
                format_args!("no exchange '{}' in vhost '{vhost}'", binding.source),
            ));
        }
        let Some(exclusive) = destination else {
            let kind = match binding.destination {
                Destination::Queue(_) => "queue",
                Destination::Exchange(_) => "exchange",
            };
            return Err(refused(
                ReplyCode::NotFound,
                format_args!("no {kind} '{destination_name}' in vhost '{vhost}'"),
            ));
        };
        if exclusive.is_some_and(|owner| owner != requester) {
            return Err(locked(destination_name, vhost));
        }
        if bind != already {
            let op = if bind {
                MetaOp::Bind(binding.clone())
            } else {
                MetaOp::Unbind(binding.clone())
            };
            self.apply_everywhere(shard, vhost, op).await?;
        }
        Ok(MetaOutcome::Done)
    }

    /// Asks the owner to drop the queue's data (checking if-unused/if-empty there, where the
    /// counts live), then removes the queue from every routing table.
    async fn delete_queue(
        &self,
        shard: &Rc<ShardBroker>,
        vhost: &ShortStr,
        def: &QueueDef,
        if_unused: bool,
        if_empty: bool,
    ) -> Result<u32, AmqpError> {
        let queue = QueueKey::new(vhost.clone(), def.name.clone());
        let reply = shard
            .request(def.owner, |token| ShardMessage::DeleteQueueData {
                token,
                queue,
                if_unused,
                if_empty,
            })
            .await;
        let message_count = match reply {
            Some(Reply::Count(result)) => result?,
            other => return Err(internal_error("queue delete", &other)),
        };
        self.apply_everywhere(
            shard,
            vhost,
            MetaOp::DeleteQueue {
                name: def.name.clone(),
            },
        )
        .await?;
        Ok(message_count)
    }
}
