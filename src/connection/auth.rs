//! Authentication: SASL PLAIN and AMQPLAIN responses checked against the configured users, and
//! the vhost access check of connection.open.

use std::net::IpAddr;

use bytes::Bytes;

use crate::codec::{read_table_entries, FieldValue};
use crate::config::Config;

/// The mechanisms offered in connection.start, space-separated as the spec wants them.
pub const MECHANISMS: &str = "PLAIN AMQPLAIN";

#[derive(Debug, Clone)]
struct User {
    name: String,
    password: String,
    loopback_only: bool,
    vhosts: Vec<String>,
}

/// Users and vhosts, as a shard holds them.
#[derive(Debug, Clone)]
pub struct Directory {
    users: Vec<User>,
    vhosts: Vec<String>,
}

/// Why a login was refused; logged, never sent (the client gets one generic text).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoginError {
    UnsupportedMechanism(String),
    MalformedResponse,
    UnknownUser(String),
    WrongPassword(String),
    LoopbackOnly(String),
}

impl std::fmt::Display for LoginError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LoginError::UnsupportedMechanism(m) => write!(f, "unsupported mechanism {m:?}"),
            LoginError::MalformedResponse => write!(f, "malformed SASL response"),
            LoginError::UnknownUser(u) => write!(f, "user {u:?} does not exist"),
            LoginError::WrongPassword(u) => write!(f, "wrong password for user {u:?}"),
            LoginError::LoopbackOnly(u) => {
                write!(f, "user {u:?} can only connect via localhost")
            }
        }
    }
}

/// Compares without an early exit, so the time taken does not tell how much of a guess matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

/// Splits a SASL response into (user, password).
fn credentials(mechanism: &[u8], response: &Bytes) -> Result<(String, Vec<u8>), LoginError> {
    match mechanism {
        // authzid NUL authcid NUL password; the authzid is ignored, as RabbitMQ does.
        b"PLAIN" => {
            let mut parts = response.split(|b| *b == 0);
            let (Some(_authzid), Some(user), Some(password), None) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                return Err(LoginError::MalformedResponse);
            };
            let user =
                String::from_utf8(user.to_vec()).map_err(|_| LoginError::MalformedResponse)?;
            Ok((user, password.to_vec()))
        }
        // A field table without its length prefix, holding LOGIN and PASSWORD.
        b"AMQPLAIN" => {
            let table = read_table_entries(response).map_err(|_| LoginError::MalformedResponse)?;
            let text = |name: &str| match table.get(name) {
                Some(FieldValue::LongStr(s)) => Some(s.as_bytes().to_vec()),
                _ => None,
            };
            let user = text("LOGIN").ok_or(LoginError::MalformedResponse)?;
            let password = text("PASSWORD").ok_or(LoginError::MalformedResponse)?;
            let user = String::from_utf8(user).map_err(|_| LoginError::MalformedResponse)?;
            Ok((user, password))
        }
        other => Err(LoginError::UnsupportedMechanism(
            String::from_utf8_lossy(other).into_owned(),
        )),
    }
}

impl Directory {
    pub fn from_config(config: &Config) -> Directory {
        Directory {
            users: config
                .users
                .iter()
                .map(|u| User {
                    name: u.name.clone(),
                    password: u.password.clone(),
                    loopback_only: u.loopback_only,
                    vhosts: u.vhosts.clone(),
                })
                .collect(),
            vhosts: config.vhosts.clone(),
        }
    }

    /// Checks a connection.start-ok; returns the user name.
    pub fn login(
        &self,
        mechanism: &[u8],
        response: &Bytes,
        peer: IpAddr,
    ) -> Result<String, LoginError> {
        let (name, password) = credentials(mechanism, response)?;
        self.check_password(&name, &password, peer)?;
        Ok(name)
    }

    /// Checks `password` for `name` connecting from `peer`.
    pub fn check_password(
        &self,
        name: &str,
        password: &[u8],
        peer: IpAddr,
    ) -> Result<(), LoginError> {
        let user = self
            .users
            .iter()
            .find(|u| u.name == name)
            .ok_or_else(|| LoginError::UnknownUser(name.to_string()))?;
        if !constant_time_eq(user.password.as_bytes(), password) {
            return Err(LoginError::WrongPassword(name.to_string()));
        }
        if user.loopback_only && !is_loopback(peer) {
            return Err(LoginError::LoopbackOnly(name.to_string()));
        }
        Ok(())
    }

    pub fn vhost_exists(&self, vhost: &str) -> bool {
        self.vhosts.iter().any(|v| v == vhost)
    }

    pub fn may_access(&self, user: &str, vhost: &str) -> bool {
        self.users
            .iter()
            .any(|u| u.name == user && u.vhosts.iter().any(|v| v == vhost))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{write_table_entries, FieldTable, LongStr, ShortStr};
    use bytes::BytesMut;

    fn directory() -> Directory {
        Directory::from_config(&Config::default_config().unwrap())
    }

    const LOOPBACK: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    #[test]
    fn plain_login() {
        let d = directory();
        let ok = Bytes::from_static(b"\0guest\0guest");
        assert_eq!(d.login(b"PLAIN", &ok, LOOPBACK), Ok("guest".to_string()));
        let bad = Bytes::from_static(b"\0guest\0nope");
        assert_eq!(
            d.login(b"PLAIN", &bad, LOOPBACK),
            Err(LoginError::WrongPassword("guest".into()))
        );
        let garbage = Bytes::from_static(b"guest");
        assert_eq!(
            d.login(b"PLAIN", &garbage, LOOPBACK),
            Err(LoginError::MalformedResponse)
        );
    }

    #[test]
    fn amqplain_login() {
        let table: FieldTable = [
            (
                ShortStr::from_static("LOGIN"),
                FieldValue::LongStr(LongStr::from("guest")),
            ),
            (
                ShortStr::from_static("PASSWORD"),
                FieldValue::LongStr(LongStr::from("guest")),
            ),
        ]
        .into_iter()
        .collect();
        let mut out = BytesMut::new();
        write_table_entries(&mut out, &table);
        assert_eq!(
            directory().login(b"AMQPLAIN", &out.freeze(), LOOPBACK),
            Ok("guest".to_string())
        );
    }

    #[test]
    fn guest_is_refused_from_a_remote_address() {
        let remote: IpAddr = "10.1.2.3".parse().unwrap();
        let ok = Bytes::from_static(b"\0guest\0guest");
        assert_eq!(
            directory().login(b"PLAIN", &ok, remote),
            Err(LoginError::LoopbackOnly("guest".into()))
        );
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        assert!(directory().login(b"PLAIN", &ok, mapped).is_ok());
    }

    #[test]
    fn unknown_mechanism_and_user() {
        let d = directory();
        let ok = Bytes::from_static(b"\0guest\0guest");
        assert!(matches!(
            d.login(b"EXTERNAL", &ok, LOOPBACK),
            Err(LoginError::UnsupportedMechanism(_))
        ));
        let who = Bytes::from_static(b"\0alice\0guest");
        assert_eq!(
            d.login(b"PLAIN", &who, LOOPBACK),
            Err(LoginError::UnknownUser("alice".into()))
        );
    }

    #[test]
    fn vhost_access() {
        let d = directory();
        assert!(d.vhost_exists("/"));
        assert!(!d.vhost_exists("other"));
        assert!(d.may_access("guest", "/"));
        assert!(!d.may_access("nobody", "/"));
    }
}
