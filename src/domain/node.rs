//! `NodeName`: a Docker host's name (SPEC §12), from `RTM_NODE` or a
//! start's `node` field. It names a queue (`<RTM_COMMAND_QUEUE>.node.<node>`)
//! and a routing key (`node.<node>`), hence the same strict pattern as a
//! game_id: `^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$`. Topic routing keys split
//! on `.`, which is harmless here: the binding is the whole key, no
//! wildcard.

use std::fmt;

use serde::Serialize;

use super::game_id::{NameShape, name_shape};

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct NodeName(String);

impl NodeName {
    pub const MAX_LEN: usize = 63;

    pub fn parse(raw: &str) -> Result<Self, String> {
        match name_shape(raw, Self::MAX_LEN) {
            Ok(()) => Ok(Self(raw.to_owned())),
            Err(NameShape::Empty) => Err("a node name must not be empty".into()),
            Err(NameShape::TooLong) => Err(format!(
                "node {raw:?} is longer than {} characters",
                Self::MAX_LEN
            )),
            Err(NameShape::Malformed) => Err(format!(
                "node {raw:?} must start with a letter or digit and contain only letters, digits, '_', '.' and '-'"
            )),
        }
    }

    /// This machine's host name, the default node: the kernel's, else
    /// `/etc/hostname`. A host name is at most 64 bytes of `[A-Za-z0-9-.]`,
    /// so it parses unless it is empty or 64 long; the caller reports that
    /// as a bad `RTM_NODE` default.
    pub fn host() -> Result<Self, String> {
        let raw = ["/proc/sys/kernel/hostname", "/etc/hostname"]
            .iter()
            .find_map(|path| std::fs::read_to_string(path).ok())
            .unwrap_or_default();
        Self::parse(raw.trim())
            .map_err(|e| format!("the host name cannot be a node name ({e}): set RTM_NODE"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The routing key of this node's queue's binding.
    pub fn routing_key(&self) -> String {
        format!("node.{}", self.0)
    }

    /// This node's own command queue, beside the shared `command_queue`.
    pub fn queue(&self, command_queue: &str) -> String {
        format!("{command_queue}.node.{}", self.0)
    }
}

impl fmt::Display for NodeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_game_id_pattern() {
        for ok in ["a", "node-1", "host.example", "N_2", &"x".repeat(63)] {
            assert!(NodeName::parse(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", ".a", "a b", "a/b", "a#", "ü", &"x".repeat(64)] {
            assert!(NodeName::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_queue_and_routing_key_name_the_node() {
        let node = NodeName::parse("b").unwrap();
        assert_eq!(node.routing_key(), "node.b");
        assert_eq!(
            node.queue("rtmanager.commands"),
            "rtmanager.commands.node.b"
        );
    }
}
