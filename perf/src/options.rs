//! loadgen's command line.

pub const USAGE: &str = "\
loadgen — an AMQP 0.9.1 load generator (PerfTest-style)

USAGE: loadgen [OPTIONS]

  --host HOST              broker host (127.0.0.1)
  --port PORT              broker port (5672)
  --user USER --password P credentials (guest/guest)
  --vhost VHOST            virtual host (/)
  --producers N            producers, one connection each (1)
  --consumers N            consumers, one connection each (1)
  --queues N               queues, producer/consumer i uses queue i mod N (1)
  --queue-prefix NAME      queue names are NAME-<i> (loadgen)
  --size BYTES             body size, at least 16 (16)
  --confirm WINDOW         publisher confirms with at most WINDOW outstanding per producer
  --persistent             persistent messages on durable queues
  --prefetch N             consumer prefetch (basic.qos)
  --multi-ack N            ack every N messages with multiple (1)
  --auto-ack               consume in no-ack mode
  --rate MSGS_PER_SEC      fixed publishing rate per producer
  --exchange KIND          default | direct | fanout | topic (default)
  --idle-connections N     extra connections that only stay open (0)
  --duration SECONDS       measured time (10)
  --messages N             stop each producer after N messages
  --consume-limit N        stop when consumers received N messages in total
  --purge                  purge the queues before starting
  --cleanup                delete the queues (and the fanout exchange) at the end
  --label NAME             label in the output (run)
  --json                   also print one JSON line
";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExchangeKind {
    Default,
    Direct,
    Fanout,
    Topic,
}

#[derive(Debug, Clone)]
pub struct Options {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: String,
    pub vhost: String,
    pub producers: usize,
    pub consumers: usize,
    pub queues: usize,
    pub queue_prefix: String,
    pub size: usize,
    pub confirm: Option<u64>,
    pub persistent: bool,
    pub prefetch: Option<u16>,
    pub multi_ack: u64,
    pub auto_ack: bool,
    pub rate: Option<f64>,
    pub exchange: ExchangeKind,
    pub idle_connections: usize,
    pub duration: f64,
    pub messages: Option<u64>,
    pub consume_limit: Option<u64>,
    pub purge: bool,
    pub cleanup: bool,
    pub label: String,
    pub json: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            host: "127.0.0.1".into(),
            port: 5672,
            user: "guest".into(),
            password: "guest".into(),
            vhost: "/".into(),
            producers: 1,
            consumers: 1,
            queues: 1,
            queue_prefix: "loadgen".into(),
            size: 16,
            confirm: None,
            persistent: false,
            prefetch: None,
            multi_ack: 1,
            auto_ack: false,
            rate: None,
            exchange: ExchangeKind::Default,
            idle_connections: 0,
            duration: 10.0,
            messages: None,
            consume_limit: None,
            purge: false,
            cleanup: false,
            label: "run".into(),
            json: false,
        }
    }
}

fn number<T: std::str::FromStr>(flag: &str, value: Option<String>) -> Result<T, String> {
    let value = value.ok_or_else(|| format!("{flag} needs a value"))?;
    value
        .parse()
        .map_err(|_| format!("{flag} {value:?}: not a valid number"))
}

pub fn parse(args: impl IntoIterator<Item = String>) -> Result<Options, String> {
    let mut options = Options::default();
    let mut args = args.into_iter();
    while let Some(flag) = args.next() {
        let mut value = || args.next();
        match flag.as_str() {
            "--host" => options.host = value().ok_or("--host needs a value")?,
            "--port" => options.port = number(&flag, value())?,
            "--user" => options.user = value().ok_or("--user needs a value")?,
            "--password" => options.password = value().ok_or("--password needs a value")?,
            "--vhost" => options.vhost = value().ok_or("--vhost needs a value")?,
            "--producers" => options.producers = number(&flag, value())?,
            "--consumers" => options.consumers = number(&flag, value())?,
            "--queues" => options.queues = number::<usize>(&flag, value())?.max(1),
            "--queue-prefix" => {
                options.queue_prefix = value().ok_or("--queue-prefix needs a value")?
            }
            "--size" => options.size = number::<usize>(&flag, value())?.max(16),
            "--confirm" => options.confirm = Some(number::<u64>(&flag, value())?.max(1)),
            "--persistent" => options.persistent = true,
            "--prefetch" => options.prefetch = Some(number(&flag, value())?),
            "--multi-ack" => options.multi_ack = number::<u64>(&flag, value())?.max(1),
            "--auto-ack" => options.auto_ack = true,
            "--rate" => options.rate = Some(number(&flag, value())?),
            "--exchange" => {
                options.exchange = match value().as_deref() {
                    Some("default") => ExchangeKind::Default,
                    Some("direct") => ExchangeKind::Direct,
                    Some("fanout") => ExchangeKind::Fanout,
                    Some("topic") => ExchangeKind::Topic,
                    other => {
                        return Err(format!(
                            "--exchange {other:?}: default, direct, fanout or topic"
                        ))
                    }
                }
            }
            "--idle-connections" => options.idle_connections = number(&flag, value())?,
            "--duration" => options.duration = number(&flag, value())?,
            "--messages" => options.messages = Some(number(&flag, value())?),
            "--consume-limit" => options.consume_limit = Some(number(&flag, value())?),
            "--purge" => options.purge = true,
            "--cleanup" => options.cleanup = true,
            "--label" => options.label = value().ok_or("--label needs a value")?,
            "--json" => options.json = true,
            "-h" | "--help" => return Err("help".into()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(options)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Result<Options, String> {
        parse(list.iter().map(|s| s.to_string()))
    }

    #[test]
    fn flags_parse() {
        let options = args(&[
            "--producers",
            "4",
            "--consumers",
            "4",
            "--queues",
            "4",
            "--size",
            "1024",
            "--confirm",
            "1000",
            "--persistent",
            "--exchange",
            "fanout",
            "--json",
        ])
        .unwrap();
        assert_eq!(
            (options.producers, options.consumers, options.queues),
            (4, 4, 4)
        );
        assert_eq!(options.size, 1024);
        assert_eq!(options.confirm, Some(1000));
        assert!(options.persistent && options.json);
        assert_eq!(options.exchange, ExchangeKind::Fanout);
    }

    #[test]
    fn mistakes_are_explained() {
        assert!(args(&["--size", "big"]).unwrap_err().contains("--size"));
        assert!(args(&["--exchange", "nope"]).is_err());
        assert!(args(&["--bogus"]).is_err());
        assert_eq!(args(&["--size", "1"]).unwrap().size, 16);
    }
}
