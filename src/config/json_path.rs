//! The small JSON path a rollout step's `expect_json` uses to pick one value out of a
//! response body: `$` followed by `.name`, `["name"]` or `[index]` parts, like `$.status`,
//! `$.items[0].state` or `$["x-id"]`. No wildcards, filters, slices or recursive descent:
//! a step checks one value.

use serde_json::Value;

/// Longest path accepted, in bytes.
pub const MAX_PATH_LEN: usize = 256;

/// One part of a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    /// An object member.
    Key(String),
    /// An array element (0-based).
    Index(usize),
}

/// A parsed path; [`JsonPath::lookup`] reads it out of a document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonPath {
    text: String,
    segments: Vec<Segment>,
}

impl JsonPath {
    /// Parses `$`, `$.a.b`, `$.a[2]`, `$["a b"]`; the error says what is wrong.
    pub fn parse(text: &str) -> Result<JsonPath, String> {
        if text.len() > MAX_PATH_LEN {
            return Err(format!("at most {MAX_PATH_LEN} bytes"));
        }
        let Some(mut rest) = text.strip_prefix('$') else {
            return Err(format!("{text:?}: must start with `$`"));
        };
        let mut segments = Vec::new();
        while !rest.is_empty() {
            if let Some(r) = rest.strip_prefix('.') {
                let end = r
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '-'))
                    .unwrap_or(r.len());
                if end == 0 {
                    return Err(format!("{text:?}: a name must follow `.`"));
                }
                segments.push(Segment::Key(r[..end].to_string()));
                rest = &r[end..];
            } else if let Some(r) = rest.strip_prefix("[\"") {
                let end = r
                    .find("\"]")
                    .ok_or_else(|| format!("{text:?}: `[\"` without `\"]`"))?;
                segments.push(Segment::Key(r[..end].to_string()));
                rest = &r[end + 2..];
            } else if let Some(r) = rest.strip_prefix('[') {
                let end = r
                    .find(']')
                    .ok_or_else(|| format!("{text:?}: `[` without `]`"))?;
                let i = r[..end]
                    .parse()
                    .map_err(|_| format!("{text:?}: `[{}]` is not an index", &r[..end]))?;
                segments.push(Segment::Index(i));
                rest = &r[end + 1..];
            } else {
                return Err(format!(
                    "{text:?}: expected `.name`, `[\"name\"]` or `[index]` at {rest:?}"
                ));
            }
        }
        Ok(JsonPath {
            text: text.to_string(),
            segments,
        })
    }

    /// The value at this path in `doc`, if there is one.
    pub fn lookup<'a>(&self, doc: &'a Value) -> Option<&'a Value> {
        self.segments.iter().try_fold(doc, |v, s| match s {
            Segment::Key(k) => v.get(k.as_str()),
            Segment::Index(i) => v.get(*i),
        })
    }

    /// The path as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn reads_members_and_elements() {
        let doc = json!({"status": "ok", "items": [{"id": 7}, {"id": 8}], "x-y": {"a b": true}});
        let at = |p: &str| JsonPath::parse(p).unwrap().lookup(&doc).cloned();
        assert_eq!(at("$.status"), Some(json!("ok")));
        assert_eq!(at("$.items[1].id"), Some(json!(8)));
        assert_eq!(at("$.x-y[\"a b\"]"), Some(json!(true)));
        assert_eq!(at("$"), Some(doc.clone()));
        assert_eq!(at("$.items[2]"), None);
        assert_eq!(at("$.status.deeper"), None);
        assert_eq!(at("$.items.id"), None, "no implicit iteration");
    }

    #[test]
    fn refuses_what_it_does_not_support() {
        for bad in [
            "status", "$.", "$..a", "$.a[*]", "$[-1]", "$.a[", "$[\"a", "$ a",
        ] {
            assert!(JsonPath::parse(bad).is_err(), "{bad}");
        }
        assert!(JsonPath::parse(&format!("$.{}", "a".repeat(300))).is_err());
    }
}
