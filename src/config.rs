//! Configuration: the embedded default `config.toml`, a user's file laid over it, and command-line
//! overrides on top.
//!
//! Invariant: every option has exactly one default, the one written (and documented) in the root
//! `config.toml`; this module has no second copy of them. A user's file is merged into the default
//! table key by key before the result is deserialized, so a partial file is valid.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::codec::FRAME_MIN_SIZE;
use shards::record::RECORD_PAYLOAD_BYTES_MAX;

/// The root `config.toml`, compiled in.
pub const DEFAULT_CONFIG_TOML: &str = include_str!("../config.toml");

/// Room in a log record for what a message carries besides its body and content header: queue,
/// exchange and routing key names (255 bytes each at most), ids and lengths.
const RECORD_NAMES_SLACK: u64 = 4096;

/// io_uring refuses rings with more submission entries than this (IORING_MAX_ENTRIES).
const RING_DEPTH_MAX: usize = 32768;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub listen: SocketAddr,
    pub shards: usize,
    pub data_dir: PathBuf,
    pub log_level: String,
    pub vhosts: Vec<String>,
    pub users: Vec<UserConfig>,
    pub runtime: RuntimeConfig,
    pub connection: ConnectionConfig,
    pub queues: QueuesConfig,
    pub storage: StorageConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    pub segment_bytes_max: u64,
    pub compact_live_fraction: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum QueuePlacement {
    ClientLocal,
    Balanced,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueuesConfig {
    pub placement: QueuePlacement,
    pub consumer_window_messages: u32,
    pub memory_budget_bytes: usize,
    pub disk_free_limit_bytes: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    pub name: String,
    pub password: String,
    #[serde(default)]
    pub loopback_only: bool,
    #[serde(default)]
    pub vhosts: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeConfig {
    pub io_memory_bytes: usize,
    pub ring_depth: usize,
    pub mesh_channel_capacity: usize,
    pub mesh_channel_bytes: usize,
    pub shutdown_grace_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectionConfig {
    pub frame_max_bytes: u32,
    pub channel_max: u16,
    pub heartbeat_secs: u16,
    pub handshake_timeout_ms: u64,
    pub close_timeout_ms: u64,
    pub outbound_buffer_bytes_max: usize,
    pub read_chunk_bytes: usize,
    pub read_coalesce_us: u64,
    pub message_bytes_max: u64,
    pub max_connections: usize,
}

/// Values given on the command line; `None` keeps the file's value.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Overrides {
    pub listen: Option<SocketAddr>,
    pub data_dir: Option<PathBuf>,
    pub shards: Option<usize>,
    pub log_level: Option<String>,
}

#[derive(Debug)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// The embedded default with no file over it.
    pub fn default_config() -> Result<Config, ConfigError> {
        Config::from_toml_layers(None, &Overrides::default())
    }

    /// Loads `path` (if any) over the embedded default, then applies `overrides`.
    pub fn load(path: Option<&Path>, overrides: &Overrides) -> Result<Config, ConfigError> {
        let user_text = match path {
            Some(path) => Some(std::fs::read_to_string(path).map_err(|e| {
                ConfigError(format!("cannot read config file {}: {e}", path.display()))
            })?),
            None => None,
        };
        Config::from_toml_layers(user_text.as_deref(), overrides)
    }

    /// The default, `user_toml` merged over it, then `overrides`; validated.
    pub fn from_toml_layers(
        user_toml: Option<&str>,
        overrides: &Overrides,
    ) -> Result<Config, ConfigError> {
        let mut table: toml::Table = DEFAULT_CONFIG_TOML
            .parse()
            .map_err(|e| ConfigError(format!("embedded config.toml is invalid: {e}")))?;
        if let Some(text) = user_toml {
            let user: toml::Table = text
                .parse()
                .map_err(|e| ConfigError(format!("config file is not valid TOML: {e}")))?;
            merge(&mut table, user);
        }
        let mut config: Config = toml::Value::Table(table)
            .try_into()
            .map_err(|e| ConfigError(format!("config: {e}")))?;
        if let Some(listen) = overrides.listen {
            config.listen = listen;
        }
        if let Some(data_dir) = &overrides.data_dir {
            config.data_dir = data_dir.clone();
        }
        if let Some(shards) = overrides.shards {
            config.shards = shards;
        }
        if let Some(level) = &overrides.log_level {
            config.log_level = level.clone();
        }
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let fail = |message: String| Err(ConfigError(message));
        if self.shards > 1024 {
            return fail(format!("shards = {} is more than 1024", self.shards));
        }
        if !["error", "warn", "info", "debug", "trace", "off"].contains(&self.log_level.as_str()) {
            return fail(format!(
                "log_level = {:?}: expected error, warn, info, debug, trace or off",
                self.log_level
            ));
        }
        let connection = &self.connection;
        if connection.frame_max_bytes < FRAME_MIN_SIZE {
            return fail(format!(
                "connection.frame_max_bytes = {} is below the protocol minimum {FRAME_MIN_SIZE}",
                connection.frame_max_bytes
            ));
        }
        if connection.channel_max == 0 {
            return fail("connection.channel_max must be at least 1".into());
        }
        if connection.read_chunk_bytes < 4096 {
            return fail("connection.read_chunk_bytes must be at least 4096".into());
        }
        if connection.read_coalesce_us > 100_000 {
            return fail("connection.read_coalesce_us must be at most 100000 (100 ms)".into());
        }
        if connection.outbound_buffer_bytes_max < connection.frame_max_bytes as usize {
            return fail(
                "connection.outbound_buffer_bytes_max must hold at least one frame".into(),
            );
        }
        // A message written to the log (persistent, or paged out) is one record: its body, its
        // content header (one frame) and its names must fit a record, or appending it would fail.
        let record_bytes_needed = connection
            .message_bytes_max
            .saturating_add(u64::from(connection.frame_max_bytes))
            .saturating_add(RECORD_NAMES_SLACK);
        if record_bytes_needed > RECORD_PAYLOAD_BYTES_MAX as u64 {
            return fail(format!(
                "connection.message_bytes_max ({}) plus connection.frame_max_bytes ({}) must stay \
                 below {} bytes, the largest record of the write-ahead log",
                connection.message_bytes_max,
                connection.frame_max_bytes,
                RECORD_PAYLOAD_BYTES_MAX as u64 - RECORD_NAMES_SLACK
            ));
        }
        if self.storage.segment_bytes_max < 65536 {
            return fail("storage.segment_bytes_max must be at least 65536".into());
        }
        if !(0.0..=1.0).contains(&self.storage.compact_live_fraction) {
            return fail("storage.compact_live_fraction must be between 0 and 1".into());
        }
        if self.queues.consumer_window_messages == 0 {
            return fail("queues.consumer_window_messages must be at least 1".into());
        }
        if !(1..=RING_DEPTH_MAX).contains(&self.runtime.ring_depth) {
            return fail(format!(
                "runtime.ring_depth = {} must be between 1 and {RING_DEPTH_MAX}",
                self.runtime.ring_depth
            ));
        }
        if self.runtime.mesh_channel_capacity == 0 {
            return fail("runtime.mesh_channel_capacity must be at least 1".into());
        }
        if self.runtime.mesh_channel_bytes == 0 {
            return fail("runtime.mesh_channel_bytes must be at least 1".into());
        }
        for user in &self.users {
            for vhost in &user.vhosts {
                if !self.vhosts.contains(vhost) {
                    return fail(format!(
                        "user {:?} names vhost {vhost:?}, which is not in `vhosts`",
                        user.name
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Lays `over` onto `base`: tables merge recursively, every other value replaces.
fn merge(base: &mut toml::Table, over: toml::Table) {
    for (key, value) in over {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(base_table)), toml::Value::Table(over_table)) => {
                merge(base_table, over_table)
            }
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_is_valid() {
        let config = Config::default_config().unwrap();
        assert_eq!(config.listen, "127.0.0.1:5672".parse().unwrap());
        assert_eq!(config.connection.frame_max_bytes, 131072);
        assert_eq!(config.users[0].name, "guest");
        assert!(config.users[0].loopback_only);
    }

    #[test]
    fn a_partial_file_changes_only_its_keys() {
        let config = Config::from_toml_layers(
            Some("[connection]\nheartbeat_secs = 5\n"),
            &Overrides::default(),
        )
        .unwrap();
        assert_eq!(config.connection.heartbeat_secs, 5);
        assert_eq!(config.connection.channel_max, 2047);
        assert_eq!(config.vhosts, vec!["/".to_string()]);
    }

    #[test]
    fn overrides_win_over_the_file() {
        let overrides = Overrides {
            listen: Some("127.0.0.1:0".parse().unwrap()),
            shards: Some(3),
            ..Default::default()
        };
        let config = Config::from_toml_layers(Some("shards = 1\n"), &overrides).unwrap();
        assert_eq!(config.shards, 3);
        assert_eq!(config.listen.port(), 0);
    }

    #[test]
    fn bad_values_are_refused_with_the_key_named() {
        let err = Config::from_toml_layers(
            Some("[connection]\nframe_max_bytes = 100\n"),
            &Overrides::default(),
        )
        .unwrap_err();
        assert!(err.0.contains("frame_max_bytes"), "{err}");
        let err = Config::from_toml_layers(Some("bogus = 1\n"), &Overrides::default()).unwrap_err();
        assert!(err.0.contains("bogus"), "{err}");
        let err = Config::from_toml_layers(
            Some("[[users]]\nname = \"a\"\npassword = \"b\"\nvhosts = [\"nope\"]\n"),
            &Overrides::default(),
        )
        .unwrap_err();
        assert!(err.0.contains("nope"), "{err}");
        for limits in [
            "message_bytes_max = 1073741824",
            "message_bytes_max = 536870912",
            "frame_max_bytes = 536870912\noutbound_buffer_bytes_max = 536870912",
        ] {
            let err = Config::from_toml_layers(
                Some(&format!("[connection]\n{limits}\n")),
                &Overrides::default(),
            )
            .unwrap_err();
            assert!(err.0.contains("largest record"), "{err}");
        }
        Config::from_toml_layers(
            Some("[connection]\nmessage_bytes_max = 536000000\n"),
            &Overrides::default(),
        )
        .expect("a message just under the record limit is allowed");
        for depth in ["0", "65536"] {
            let err = Config::from_toml_layers(
                Some(&format!("[runtime]\nring_depth = {depth}\n")),
                &Overrides::default(),
            )
            .unwrap_err();
            assert!(err.0.contains("ring_depth"), "{err}");
        }
        let err = Config::from_toml_layers(
            Some("[connection]\nread_coalesce_us = 100001\n"),
            &Overrides::default(),
        )
        .unwrap_err();
        assert!(err.0.contains("read_coalesce_us"), "{err}");
    }
}
