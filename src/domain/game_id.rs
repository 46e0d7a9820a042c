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

impl GameId {
    pub const MAX_LEN: usize = 63;

    pub fn parse(raw: &str) -> Result<Self, GameIdError> {
        let mut chars = raw.chars();
        let Some(first) = chars.next() else {
            return Err(GameIdError::Empty);
        };
        if raw.len() > Self::MAX_LEN {
            return Err(GameIdError::TooLong(raw.to_owned()));
        }
        let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
        if !first.is_ascii_alphanumeric() || !rest_ok {
            return Err(GameIdError::Malformed(raw.to_owned()));
        }
        Ok(Self(raw.to_owned()))
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
