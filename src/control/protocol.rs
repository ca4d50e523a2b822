//! What travels on the control socket: one request per connection as a line of JSON, and
//! one reply line. JSON escapes line breaks inside strings, so a line is always one message.
//! Fields a side does not know are ignored, so that a newer command may add optional ones.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "kebab-case")]
pub enum Request {
    /// Read the config file again and apply it, as SIGHUP does.
    Reload,
    /// Hand the listeners over to a new process started from `binary`, then drain and exit.
    /// (Text rather than a path: JSON holds only UTF-8.)
    Upgrade { binary: String },
    /// Give the active role to a peer in a planned way.
    HaSwitchover,
    /// Who answers: see [`Status`].
    Status,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    /// What happened, or every reason it did not (config errors with file:line:col).
    pub message: String,
    /// With a `status` request's reply only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
}

impl Reply {
    pub fn ok(message: impl Into<String>) -> Reply {
        Reply {
            ok: true,
            message: message.into(),
            status: None,
        }
    }

    pub fn error(message: impl Into<String>) -> Reply {
        Reply {
            ok: false,
            message: message.into(),
            status: None,
        }
    }
}

impl From<Result<String, String>> for Reply {
    fn from(outcome: Result<String, String>) -> Reply {
        match outcome {
            Ok(message) => Reply::ok(message),
            Err(message) => Reply::error(message),
        }
    }
}

/// The process behind a control socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub pid: u32,
    /// The config file it was started with, as it was named then.
    pub config: String,
    /// When it started, in seconds since the Unix epoch.
    pub started: u64,
    pub version: String,
}

/// `message` as one line of JSON, newline included.
pub fn encode(message: &impl Serialize) -> Vec<u8> {
    let mut line = serde_json::to_vec(message).expect("control messages always serialize");
    line.push(b'\n');
    line
}

/// A request line (its newline optional), or why it is not one.
pub fn decode_request(line: &[u8]) -> Result<Request, String> {
    serde_json::from_slice(line.trim_ascii()).map_err(|e| {
        format!(
            "not a control request ({e}): send one line of JSON such as {{\"request\":\"reload\"}}; \
             requests: reload, upgrade (with \"binary\"), ha-switchover, status"
        )
    })
}

/// A reply line, or why it is not one.
pub fn decode_reply(line: &[u8]) -> Result<Reply, String> {
    serde_json::from_slice(line.trim_ascii())
        .map_err(|e| format!("the control socket answered something that is not a reply: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn requests_read_as_documented() {
        assert_eq!(
            decode_request(b"{\"request\":\"reload\"}\n"),
            Ok(Request::Reload)
        );
        assert_eq!(
            decode_request(br#"{"request":"upgrade","binary":"/usr/bin/fulcrum"}"#),
            Ok(Request::Upgrade {
                binary: "/usr/bin/fulcrum".to_string()
            })
        );
        assert_eq!(
            decode_request(br#"{"request":"ha-switchover"}"#),
            Ok(Request::HaSwitchover)
        );
        // A field of a newer command is left for it.
        assert_eq!(
            decode_request(br#"{"request":"reload","wait":true}"#),
            Ok(Request::Reload)
        );
        for bad in [
            &b""[..],
            b"reload",
            b"{\"request\":\"restart\"}",
            b"{\"request\":\"upgrade\"}",
            b"\xff\xfe",
        ] {
            let error = decode_request(bad).unwrap_err();
            assert!(error.starts_with("not a control request"), "{error}");
        }
    }

    fn request() -> impl Strategy<Value = Request> {
        prop_oneof![
            Just(Request::Reload),
            Just(Request::HaSwitchover),
            Just(Request::Status),
            any::<String>().prop_map(|binary| Request::Upgrade { binary }),
        ]
    }

    proptest! {
        #[test]
        fn every_message_is_one_line_that_reads_back(
            request in request(),
            ok in any::<bool>(),
            message in any::<String>(),
            pid in any::<u32>(),
        ) {
            let line = encode(&request);
            prop_assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
            prop_assert_eq!(decode_request(&line), Ok(request));

            let status = Status { pid, config: message.clone(), started: 1, version: "0.1.0".into() };
            let reply = Reply { ok, message, status: Some(status) };
            let line = encode(&reply);
            prop_assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
            prop_assert_eq!(decode_reply(&line), Ok(reply));
        }
    }
}
