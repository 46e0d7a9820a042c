//! `ImageRef`: a Docker image reference, kept exactly as given (so `docker
//! ps` shows what the lobby asked for), with its parts parsed once.
//!
//! The semver rules of SPEC §3: the tag is what follows the last `:` after
//! the last `/`; a leading `v` is accepted; a digest reference, a missing
//! tag and a partial version (`1.4`, `latest`) are not semver; pre-release
//! tags parse.

use std::fmt;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct ImageRef {
    raw: String,
    /// `[registry[:port]/]path/name`, without tag or digest.
    repository: String,
    tag: Option<String>,
    digest: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImageRefError {
    #[error("image reference must not be empty")]
    Empty,
    #[error("image reference {0:?} is longer than 255 characters")]
    TooLong(String),
    #[error("image reference {raw:?} is malformed: {why}")]
    Malformed { raw: String, why: &'static str },
}

/// Why an image reference does not carry a semver tag.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotSemver {
    #[error("{0:?} is a digest reference, not a semver tag")]
    Digest(String),
    #[error("{0:?} has no tag")]
    MissingTag(String),
    #[error("tag {tag:?} of {raw:?} is not a semver version: {why}")]
    NotAVersion {
        raw: String,
        tag: String,
        why: String,
    },
}

impl ImageRef {
    pub const MAX_LEN: usize = 255;

    pub fn parse(raw: &str) -> Result<Self, ImageRefError> {
        let malformed = |why| ImageRefError::Malformed {
            raw: raw.to_owned(),
            why,
        };
        if raw.is_empty() {
            return Err(ImageRefError::Empty);
        }
        if raw.len() > Self::MAX_LEN {
            return Err(ImageRefError::TooLong(raw.to_owned()));
        }
        if raw.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(malformed("contains whitespace or control characters"));
        }

        let (name_and_tag, digest) = match raw.split_once('@') {
            Some((n, d)) => {
                if !valid_digest(d) {
                    return Err(malformed("the digest is not algorithm:hex"));
                }
                (n, Some(d.to_owned()))
            }
            None => (raw, None),
        };
        // The tag is what follows the last ':' after the last '/': a ':' before
        // the last '/' is a registry port.
        let last_slash = name_and_tag.rfind('/').map_or(0, |i| i + 1);
        let (repository, tag) = match name_and_tag[last_slash..].rfind(':') {
            Some(i) => {
                let at = last_slash + i;
                (&name_and_tag[..at], Some(&name_and_tag[at + 1..]))
            }
            None => (name_and_tag, None),
        };
        if let Some(tag) = tag
            && !valid_tag(tag)
        {
            return Err(malformed(
                "the tag must be 1-128 of [A-Za-z0-9_.-], not starting with '.' or '-'",
            ));
        }
        validate_repository(repository).map_err(malformed)?;

        Ok(Self {
            raw: raw.to_owned(),
            repository: repository.to_owned(),
            tag: tag.map(str::to_owned),
            digest,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.raw
    }

    pub fn repository(&self) -> &str {
        &self.repository
    }

    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    /// The tag as a semver version (SPEC §3 rules).
    pub fn semver(&self) -> Result<semver::Version, NotSemver> {
        if self.digest.is_some() {
            return Err(NotSemver::Digest(self.raw.clone()));
        }
        let tag = self
            .tag
            .as_deref()
            .ok_or_else(|| NotSemver::MissingTag(self.raw.clone()))?;
        let version = tag.strip_prefix('v').unwrap_or(tag);
        semver::Version::parse(version).map_err(|e| NotSemver::NotAVersion {
            raw: self.raw.clone(),
            tag: tag.to_owned(),
            why: e.to_string(),
        })
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.raw)
    }
}

impl From<ImageRef> for String {
    fn from(value: ImageRef) -> Self {
        value.raw
    }
}

impl TryFrom<&str> for ImageRef {
    type Error = ImageRefError;
    fn try_from(value: &str) -> Result<Self, Self::Error> {
        Self::parse(value)
    }
}

impl TryFrom<String> for ImageRef {
    type Error = ImageRefError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::parse(&value)
    }
}

/// A patch keeps major.minor: downgrades within the series and the same tag
/// again (a full restart on a re-pushed image) are allowed.
pub fn same_patch_series(current: &semver::Version, new: &semver::Version) -> bool {
    current.major == new.major && current.minor == new.minor
}

fn validate_repository(repo: &str) -> Result<(), &'static str> {
    if repo.is_empty() {
        return Err("the repository name is empty");
    }
    let mut components: Vec<&str> = repo.split('/').collect();
    // Docker's rule: the first component is a registry host when there is
    // more than one and it has a '.' or ':' or is "localhost".
    if components.len() > 1 {
        let first = components[0];
        if first.contains(['.', ':']) || first == "localhost" {
            validate_registry(first)?;
            components.remove(0);
        }
    }
    for component in components {
        if !valid_path_component(component) {
            return Err(
                "repository path components must be lowercase letters and digits, separated by '.', '_', '__' or '-'",
            );
        }
    }
    Ok(())
}

fn validate_registry(host: &str) -> Result<(), &'static str> {
    let (name, port) = match host.rsplit_once(':') {
        Some((n, p)) => (n, Some(p)),
        None => (host, None),
    };
    let name_ok = !name.is_empty()
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    if !name_ok {
        return Err("the registry host is not a valid host name");
    }
    if let Some(port) = port
        && (port.is_empty() || port.len() > 5 || !port.chars().all(|c| c.is_ascii_digit()))
    {
        return Err("the registry port is not a number");
    }
    Ok(())
}

fn valid_path_component(c: &str) -> bool {
    let is_alnum = |ch: char| ch.is_ascii_lowercase() || ch.is_ascii_digit();
    let bytes: Vec<char> = c.chars().collect();
    if bytes.is_empty() || !is_alnum(bytes[0]) || !is_alnum(bytes[bytes.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < bytes.len() {
        let ch = bytes[i];
        if is_alnum(ch) {
            i += 1;
            continue;
        }
        // A separator run: '.', '_', '__', or one or more '-'.
        let start = i;
        while i < bytes.len() && !is_alnum(bytes[i]) {
            i += 1;
        }
        let sep: String = bytes[start..i].iter().collect();
        let ok = sep == "." || sep == "_" || sep == "__" || sep.chars().all(|c| c == '-');
        if !ok {
            return false;
        }
    }
    true
}

fn valid_tag(tag: &str) -> bool {
    let mut chars = tag.chars();
    match chars.next() {
        Some(c) if c.is_ascii_alphanumeric() || c == '_' => {}
        _ => return false,
    }
    tag.len() <= 128 && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

fn valid_digest(d: &str) -> bool {
    let Some((algo, hex)) = d.split_once(':') else {
        return false;
    };
    !algo.is_empty()
        && algo.chars().all(|c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '+' | '.' | '_' | '-')
        })
        && hex.len() >= 32
        && hex.chars().all(|c| c.is_ascii_hexdigit())
}

/// `RTM_ALLOWED_IMAGES`: repository prefixes matched on `/` boundaries, so
/// `registry:5000/galaxy` allows `registry:5000/galaxy/engine` but not
/// `registry:5000/galaxy-evil/engine`. Empty allows any image.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowedImages(Vec<String>);

impl AllowedImages {
    pub fn any() -> Self {
        Self(Vec::new())
    }

    /// Parses the comma-separated variable; blank items are ignored and a
    /// trailing `/` is not significant.
    pub fn parse(list: &str) -> Self {
        Self(
            list.split(',')
                .map(|p| p.trim().trim_end_matches('/'))
                .filter(|p| !p.is_empty())
                .map(str::to_owned)
                .collect(),
        )
    }

    pub fn prefixes(&self) -> &[String] {
        &self.0
    }

    pub fn allows(&self, image: &ImageRef) -> bool {
        if self.0.is_empty() {
            return true;
        }
        let repo = image.repository();
        self.0.iter().any(|prefix| {
            repo == prefix
                || repo
                    .strip_prefix(prefix.as_str())
                    .is_some_and(|rest| rest.starts_with('/'))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(raw: &str) -> ImageRef {
        ImageRef::parse(raw).unwrap_or_else(|e| panic!("{raw}: {e}"))
    }

    #[test]
    fn parses_repository_tag_and_digest() {
        let cases = [
            // raw, repository, tag
            ("engine", "engine", None),
            ("engine:1.4.2", "engine", Some("1.4.2")),
            ("galaxy/engine:1.4.2", "galaxy/engine", Some("1.4.2")),
            (
                "registry:5000/galaxy/engine:1.4.2",
                "registry:5000/galaxy/engine",
                Some("1.4.2"),
            ),
            (
                "registry:5000/galaxy/engine",
                "registry:5000/galaxy/engine",
                None,
            ),
            (
                "localhost/engine:v2.0.0",
                "localhost/engine",
                Some("v2.0.0"),
            ),
            ("a.b-c/x__y/z-w:latest", "a.b-c/x__y/z-w", Some("latest")),
        ];
        for (raw, repo, tag) in cases {
            let r = image(raw);
            assert_eq!(r.repository(), repo, "{raw}");
            assert_eq!(r.tag(), tag, "{raw}");
            assert_eq!(r.as_str(), raw);
        }
        let digest = format!("engine@sha256:{}", "a".repeat(64));
        assert_eq!(image(&digest).repository(), "engine");
    }

    #[test]
    fn rejects_malformed_references() {
        for raw in [
            "",
            " engine:1",
            "engine:1 ",
            "Engine:1.0.0",
            "engine:",
            "engine:-1",
            "engine:.1",
            "/engine",
            "engine/",
            "galaxy//engine",
            "engine@sha256:xyz",
            "engine@nothex",
            "reg:port/engine",
            "engine:1.0:2",
            &format!("engine:{}", "1".repeat(129)),
            &format!("{}:1", "a".repeat(256)),
        ] {
            assert!(ImageRef::parse(raw).is_err(), "{raw:?} should be rejected");
        }
    }

    #[test]
    fn semver_tag_rules() {
        let ok = [
            ("engine:1.4.2", "1.4.2"),
            ("engine:v1.4.2", "1.4.2"),
            ("registry:5000/galaxy/engine:1.4.2", "1.4.2"),
            ("engine:1.4.3-rc.1", "1.4.3-rc.1"),
            ("engine:0.0.0", "0.0.0"),
        ];
        for (raw, version) in ok {
            assert_eq!(image(raw).semver().unwrap().to_string(), version, "{raw}");
        }

        let digest = format!("engine@sha256:{}", "b".repeat(64));
        let tagged_digest = format!("engine:1.4.2@sha256:{}", "b".repeat(64));
        type Expect = fn(&NotSemver) -> bool;
        let not_semver: [(&str, Expect); 8] = [
            (&digest, |e| matches!(e, NotSemver::Digest(_))),
            (&tagged_digest, |e| matches!(e, NotSemver::Digest(_))),
            ("engine", |e| matches!(e, NotSemver::MissingTag(_))),
            ("registry:5000/engine", |e| {
                matches!(e, NotSemver::MissingTag(_))
            }),
            ("engine:1.4", |e| matches!(e, NotSemver::NotAVersion { .. })),
            ("engine:latest", |e| {
                matches!(e, NotSemver::NotAVersion { .. })
            }),
            ("engine:V1.4.2", |e| {
                matches!(e, NotSemver::NotAVersion { .. })
            }),
            ("engine:01.4.2", |e| {
                matches!(e, NotSemver::NotAVersion { .. })
            }),
        ];
        for (raw, expected) in not_semver {
            let err = image(raw).semver().unwrap_err();
            assert!(expected(&err), "{raw}: {err:?}");
        }
    }

    #[test]
    fn patch_series_keeps_major_and_minor() {
        let v = |s: &str| semver::Version::parse(s).unwrap();
        let cases = [
            ("1.4.2", "1.4.3", true),
            ("1.4.2", "1.4.2", true), // same tag again: a full restart
            ("1.4.3", "1.4.1", true), // downgrade within the series
            ("1.4.2", "1.4.5-rc.1", true),
            ("1.4.2", "1.5.0", false), // minor bump
            ("1.4.2", "2.4.2", false), // major bump
            ("1.4.2", "1.3.9", false),
            ("0.1.0", "0.2.0", false),
        ];
        for (current, new, same) in cases {
            assert_eq!(
                same_patch_series(&v(current), &v(new)),
                same,
                "{current} -> {new}"
            );
        }
    }

    #[test]
    fn allow_list_matches_on_slash_boundaries() {
        let allowed = AllowedImages::parse(" registry:5000/galaxy/ , docker.io/library/busybox,,");
        assert_eq!(allowed.prefixes().len(), 2);
        let cases = [
            ("registry:5000/galaxy/engine:1.4.2", true),
            ("registry:5000/galaxy/sub/engine:1", true),
            ("registry:5000/galaxy:1.0.0", true),
            ("registry:5000/galaxy-evil/engine:1.4.2", false),
            ("registry:5000/galaxyengine:1", false),
            ("registry:5001/galaxy/engine:1.4.2", false),
            ("docker.io/library/busybox:1.36.0", true),
            ("galaxy/engine:1.4.2", false),
        ];
        for (raw, allows) in cases {
            assert_eq!(allowed.allows(&image(raw)), allows, "{raw}");
        }
        assert!(AllowedImages::parse("").allows(&image("anything/at:all")));
        assert!(AllowedImages::any().allows(&image("x")));
    }
}
