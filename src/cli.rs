//! The command line: `shardmq [--config PATH] [--listen HOST:PORT] [--data-dir DIR] [--shards N]
//! [--log-level LEVEL]`. Flags override the config file.

use std::ffi::OsString;
use std::path::PathBuf;

use crate::config::Overrides;

pub const USAGE: &str = "\
shardmq — a thread-per-core AMQP 0.9.1 broker

USAGE:
    shardmq [OPTIONS]

OPTIONS:
    --config PATH        config file laid over the embedded default (see config.toml)
    --listen HOST:PORT   address to listen on (port 0 picks a free port)
    --data-dir DIR       directory for the shards' files
    --shards N           number of shards (0 = one per CPU)
    --log-level LEVEL    error, warn, info, debug or trace
    -h, --help           print this help
    -V, --version        print the version
";

#[derive(Debug, PartialEq)]
pub enum Command {
    Run {
        config_path: Option<PathBuf>,
        overrides: Overrides,
    },
    Help,
    Version,
}

/// Parses the arguments after the program name. Accepts `--flag value` and `--flag=value`.
pub fn parse<I: IntoIterator<Item = OsString>>(args: I) -> Result<Command, String> {
    let mut config_path = None;
    let mut overrides = Overrides::default();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let arg = arg
            .into_string()
            .map_err(|a| format!("argument {a:?} is not UTF-8"))?;
        let (flag, inline_value) = match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => {
                (flag.to_string(), Some(value.to_string()))
            }
            _ => (arg, None),
        };
        let mut value = |name: &str| -> Result<String, String> {
            match &inline_value {
                Some(value) => Ok(value.clone()),
                None => args
                    .next()
                    .and_then(|v| v.into_string().ok())
                    .ok_or_else(|| format!("{name} needs a value")),
            }
        };
        match flag.as_str() {
            "-h" | "--help" => return Ok(Command::Help),
            "-V" | "--version" => return Ok(Command::Version),
            "--config" => config_path = Some(PathBuf::from(value("--config")?)),
            "--listen" => {
                let text = value("--listen")?;
                let addr = text
                    .parse()
                    .map_err(|e| format!("--listen {text:?}: expected HOST:PORT ({e})"))?;
                overrides.listen = Some(addr);
            }
            "--data-dir" => overrides.data_dir = Some(PathBuf::from(value("--data-dir")?)),
            "--shards" => {
                let text = value("--shards")?;
                let shards = text
                    .parse()
                    .map_err(|e| format!("--shards {text:?}: expected a number ({e})"))?;
                overrides.shards = Some(shards);
            }
            "--log-level" => overrides.log_level = Some(value("--log-level")?),
            other => return Err(format!("unknown argument {other:?}\n\n{USAGE}")),
        }
    }
    Ok(Command::Run {
        config_path,
        overrides,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> Result<Command, String> {
        parse(args.iter().map(OsString::from))
    }

    #[test]
    fn every_flag_in_both_forms() {
        let expected = Command::Run {
            config_path: Some(PathBuf::from("/etc/shardmq.toml")),
            overrides: Overrides {
                listen: Some("127.0.0.1:5673".parse().unwrap()),
                data_dir: Some(PathBuf::from("/tmp/d")),
                shards: Some(2),
                log_level: Some("debug".into()),
            },
        };
        let spaced = run(&[
            "--config",
            "/etc/shardmq.toml",
            "--listen",
            "127.0.0.1:5673",
            "--data-dir",
            "/tmp/d",
            "--shards",
            "2",
            "--log-level",
            "debug",
        ]);
        assert_eq!(spaced.unwrap(), expected);
        let inline = run(&[
            "--config=/etc/shardmq.toml",
            "--listen=127.0.0.1:5673",
            "--data-dir=/tmp/d",
            "--shards=2",
            "--log-level=debug",
        ]);
        assert_eq!(inline.unwrap(), expected);
    }

    #[test]
    fn mistakes_are_explained() {
        assert!(run(&["--shards", "many"]).unwrap_err().contains("--shards"));
        assert!(run(&["--listen"]).unwrap_err().contains("needs a value"));
        assert!(run(&["--frobnicate"])
            .unwrap_err()
            .contains("unknown argument"));
        assert_eq!(run(&["--help"]).unwrap(), Command::Help);
    }
}
