//! `GameId`: the game's identity, also a directory name and part of a
//! container name, hence the strict SPEC §6 pattern
//! `^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$`.

use std::fmt;

use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct GameId(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GameIdError {
    #[error("game_id must not be empty")]
    Empty,
    #[error("game_id {0:?} is longer than 63 characters")]
    TooLong(String),
    #[error(
        "game_id {0:?} must start with a letter or digit and contain only letters, digits, '_', '.' and '-'"
    )]
    Malformed(String),
}

/// How a name breaks `^[A-Za-z0-9][A-Za-z0-9_.-]{0,max-1}$`, the shape of
/// every name that becomes a directory, a container, a queue or a routing
/// key: a game_id and a node's name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NameShape {
    Empty,
    TooLong,
    Malformed,
}

/// Checks `raw` against that shape, `max` bytes at most.
pub(crate) fn name_shape(raw: &str, max: usize) -> Result<(), NameShape> {
    let mut chars = raw.chars();
    let Some(first) = chars.next() else {
        return Err(NameShape::Empty);
    };
    if raw.len() > max {
        return Err(NameShape::TooLong);
    }
    let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if !first.is_ascii_alphanumeric() || !rest_ok {
        return Err(NameShape::Malformed);
    }
    Ok(())
}

impl GameId {
    pub const MAX_LEN: usize = 63;

    pub fn parse(raw: &str) -> Result<Self, GameIdError> {
        match name_shape(raw, Self::MAX_LEN) {
            Ok(()) => Ok(Self(raw.to_owned())),
            Err(NameShape::Empty) => Err(GameIdError::Empty),
            Err(NameShape::TooLong) => Err(GameIdError::TooLong(raw.to_owned())),
            Err(NameShape::Malformed) => Err(GameIdError::Malformed(raw.to_owned())),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for GameId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<&str> for GameId {
    type Error = GameIdError;
    fn try_from(value: &str) -> Result<Self, Self::Error> {
        Self::parse(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_spec_pattern() {
        for ok in ["g", "g-1042", "A.b_c-9", "0", &"x".repeat(63)] {
            assert!(GameId::parse(ok).is_ok(), "{ok:?} should be valid");
        }
    }

    #[test]
    fn rejects_everything_else() {
        type Expect = fn(&GameIdError) -> bool;
        let cases: &[(&str, Expect)] = &[
            ("", |e| matches!(e, GameIdError::Empty)),
            ("-g", |e| matches!(e, GameIdError::Malformed(_))),
            (".hidden", |e| matches!(e, GameIdError::Malformed(_))),
            ("../etc", |e| matches!(e, GameIdError::Malformed(_))),
            ("a/b", |e| matches!(e, GameIdError::Malformed(_))),
            ("a b", |e| matches!(e, GameIdError::Malformed(_))),
            ("é", |e| matches!(e, GameIdError::Malformed(_))),
            ("g:1", |e| matches!(e, GameIdError::Malformed(_))),
        ];
        for (raw, expected) in cases {
            let err = GameId::parse(raw).unwrap_err();
            assert!(expected(&err), "{raw:?} gave {err:?}");
        }
        assert!(matches!(
            GameId::parse(&"x".repeat(64)),
            Err(GameIdError::TooLong(_))
        ));
    }
}
