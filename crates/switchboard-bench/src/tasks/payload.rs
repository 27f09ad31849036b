//! The tasks' payloads and the check of their results.
//!
//! Task `k`'s payload is `{"p":"k-xxx…"}`, padded with `x` to exactly
//! `--payload-bytes` bytes of JSON (`{"p":"xxx…"}` of 100 bytes is the
//! peers' `{"p": "x"*92}`). The number makes every payload distinct, so a
//! result handed to the wrong task is caught, at no cost in size.

use serde_json::Value;

/// `{"p":""}`: the bytes every payload has besides its string.
const FRAME_BYTES: usize = 8;

/// How the payloads are made.
#[derive(Debug, Clone)]
pub struct Payloads {
    bytes: usize,
}

impl Payloads {
    pub fn new(bytes: usize) -> Payloads {
        Payloads { bytes }
    }

    /// Task `k`'s payload as JSON text: `bytes` long whenever `k-` fits.
    pub fn text(&self, k: u64) -> String {
        let tag = format!("{k}-");
        let fill = self.bytes.saturating_sub(FRAME_BYTES + tag.len());
        let mut s = String::with_capacity(FRAME_BYTES + tag.len() + fill);
        s.push_str("{\"p\":\"");
        s.push_str(&tag);
        s.extend(std::iter::repeat_n('x', fill));
        s.push_str("\"}");
        s
    }
}

/// The `task` frame submitting task `k` with `ref` `reference`.
pub fn task_frame(name_json: &str, payload: &str, reference: u64) -> String {
    format!(r#"{{"type":"task","name":{name_json},"payload":{payload},"ref":{reference}}}"#)
}

/// Whether a `done` frame's `result` (raw JSON) is the payload: the same
/// text, or (spaced or ordered differently) the same JSON value.
pub fn result_matches(result: Option<&str>, payload: &str) -> bool {
    let Some(result) = result else {
        return false;
    };
    if result == payload {
        return true;
    }
    match (
        serde_json::from_str::<Value>(result),
        serde_json::from_str::<Value>(payload),
    ) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_have_the_asked_size_and_are_distinct() {
        let p = Payloads::new(100);
        for k in [0, 7, 12_345, 999_999_999] {
            let text = p.text(k);
            assert_eq!(text.len(), 100, "{text}");
            let v: Value = serde_json::from_str(&text).unwrap();
            assert!(v["p"].as_str().unwrap().starts_with(&format!("{k}-x")));
        }
        assert_ne!(p.text(1), p.text(2));
        // Too small to pad: just the tag.
        assert_eq!(Payloads::new(5).text(3), r#"{"p":"3-"}"#);
    }

    #[test]
    fn the_frame_is_a_task_submission() {
        let payload = Payloads::new(20).text(4);
        let name = serde_json::to_string("echo").unwrap();
        let frame = task_frame(&name, &payload, 9);
        let v: Value = serde_json::from_str(&frame).unwrap();
        assert_eq!(v["type"], "task");
        assert_eq!(v["name"], "echo");
        assert_eq!(v["ref"], 9);
        assert_eq!(
            v["payload"],
            serde_json::from_str::<Value>(&payload).unwrap()
        );
        let odd = serde_json::to_string("a\"b").unwrap();
        let v: Value = serde_json::from_str(&task_frame(&odd, "null", 1)).unwrap();
        assert_eq!(v["name"], "a\"b");
    }

    #[test]
    fn results_are_checked_against_the_payload() {
        let p = Payloads::new(30);
        let (a, b) = (p.text(1), p.text(2));
        assert!(result_matches(Some(&a), &a));
        assert!(!result_matches(Some(&b), &a));
        assert!(!result_matches(None, &a));
        assert!(!result_matches(Some("null"), &a));
        assert!(!result_matches(Some("{not json"), &a));
        let spaced = a.replace(':', ": ");
        assert!(result_matches(Some(&spaced), &a));
        assert!(result_matches(Some(r#"{"b":1,"a":2}"#), r#"{"a":2,"b":1}"#));
    }
}
