//! The call format. A model's turn is an optional thought, then one call:
//!
//! ```text
//! <|thought_start|>the loop reads past the end<|thought_end|><|query_tool|>{"tool": "open", "path": "src/stats.cpp", "line": 10}
//! ```
//!
//! and the turn ends (`<|eos|>`). The answer comes back as a `tool` turn, which the chat
//! template opens with `<|tool_result|>`. The markers are special tokens of the model
//! (`cxxlm_tokenizer::chat::AGENT_MARKERS`); over an OpenAI-compatible API they travel as
//! their spellings.

use serde::{Deserialize, Serialize};

pub const THOUGHT_START: &str = "<|thought_start|>";
pub const THOUGHT_END: &str = "<|thought_end|>";
pub const QUERY_TOOL: &str = "<|query_tool|>";

/// One tool call, as the JSON object after `<|query_tool|>` spells it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "tool", rename_all = "snake_case", deny_unknown_fields)]
pub enum Call {
    /// Files under a folder of the repository (its root by default).
    List { path: Option<String> },
    /// Lines holding `text`, or the definitions named `symbol` (from the index).
    Search {
        text: Option<String>,
        symbol: Option<String>,
    },
    /// Numbered lines of a file from `line` (default 1), `lines` of them (default 60).
    Open {
        path: String,
        line: Option<usize>,
        lines: Option<usize>,
    },
    /// Lines `start..=end` of a file replaced by `text` (`end = start - 1` inserts).
    Edit {
        path: String,
        start: usize,
        end: usize,
        text: String,
    },
    /// The build command in the sandbox. (Variants without arguments are empty structs,
    /// so that unknown fields are refused there too.)
    Build {},
    /// The test command in the sandbox.
    Test {},
    /// The definitions that matter at a file's line (the repository index's ranking).
    Index { path: String, line: usize },
    /// The work is done: the tests decide.
    Submit {},
}

impl Call {
    /// The tool's name, as the call spells it.
    pub fn name(&self) -> &'static str {
        match self {
            Call::List { .. } => "list",
            Call::Search { .. } => "search",
            Call::Open { .. } => "open",
            Call::Edit { .. } => "edit",
            Call::Build {} => "build",
            Call::Test {} => "test",
            Call::Index { .. } => "index",
            Call::Submit {} => "submit",
        }
    }
}

/// A turn read: its thought, and its call or why there is none.
#[derive(Debug, Clone, PartialEq)]
pub struct Turn {
    pub thought: Option<String>,
    pub call: Result<Call, String>,
}

pub fn parse(output: &str) -> Turn {
    let thought = output.find(THOUGHT_START).map(|at| {
        let rest = &output[at + THOUGHT_START.len()..];
        let end = rest.find(THOUGHT_END).unwrap_or(rest.len());
        rest[..end].trim().to_string()
    });
    let call = match output.find(QUERY_TOOL) {
        None => Err(format!(
            "no tool call: end the turn with {QUERY_TOOL} and one JSON object such as {{\"tool\": \"open\", \"path\": \"main.cpp\"}}"
        )),
        Some(at) => call(&output[at + QUERY_TOOL.len()..]),
    };
    Turn { thought, call }
}

/// Whether `output` holds a whole call: the marker, then a complete JSON object. A reply
/// can end there, as whatever the model wrote after it would make the turn unreadable.
pub fn holds_a_call(output: &str) -> bool {
    output.find(QUERY_TOOL).is_some_and(|at| {
        matches!(leading_json(&output[at + QUERY_TOOL.len()..]), Some(Ok((v, _))) if v.is_object())
    })
}

/// The JSON value `text` begins with, and the byte where it ends.
fn leading_json(text: &str) -> Option<serde_json::Result<(serde_json::Value, usize)>> {
    let mut values = serde_json::Deserializer::from_str(text).into_iter::<serde_json::Value>();
    values.next().map(|v| v.map(|v| (v, values.byte_offset())))
}

fn call(text: &str) -> Result<Call, String> {
    let (value, end) = match leading_json(text) {
        None => return Err(format!("{QUERY_TOOL} is followed by no JSON object")),
        Some(Err(e)) => return Err(format!("the call is not JSON: {e}")),
        Some(Ok(v)) => v,
    };
    if !text[end..].trim().is_empty() {
        return Err(
            "one call per turn: the text after the call's JSON object is not allowed".into(),
        );
    }
    if !value.is_object() {
        return Err(format!(
            "the call must be a JSON object with a \"tool\", not {value}"
        ));
    }
    serde_json::from_value(value).map_err(|e| format!("bad call: {e}"))
}

/// How a call is written in a turn.
pub fn render(thought: Option<&str>, call: &Call) -> String {
    let json = serde_json::to_string(call).unwrap_or_default();
    match thought {
        Some(t) => format!("{THOUGHT_START}{t}{THOUGHT_END}{QUERY_TOOL}{json}"),
        None => format!("{QUERY_TOOL}{json}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_is_whole_once_its_object_closes() {
        let call = render(Some("look"), &Call::Test {});
        assert!(holds_a_call(&call));
        assert!(holds_a_call(&format!("{call}\nand then more")));
        let open =
            r#"<|query_tool|>{"tool": "edit", "path": "a.cpp", "start": 1, "end": 1, "text": "}\n"#;
        assert!(
            !holds_a_call(open),
            "a brace inside a string does not close the object"
        );
        assert!(holds_a_call(&format!("{open}\"}}")));
        assert!(!holds_a_call("<|thought_start|>no call yet"));
        assert!(!holds_a_call("<|query_tool|>12"), "not an object");
    }

    #[test]
    fn calls_round_trip_and_bad_ones_say_why() {
        let c = Call::Edit {
            path: "a.cpp".into(),
            start: 3,
            end: 4,
            text: "int x;\n".into(),
        };
        let turn = parse(&render(Some("fix it"), &c));
        assert_eq!(turn.thought.as_deref(), Some("fix it"));
        assert_eq!(turn.call, Ok(c.clone()));
        let json = serde_json::to_value(&c).unwrap();
        assert_eq!(json["tool"], c.name());
        assert_eq!(
            parse(r#"<|query_tool|>{"tool":"build"}"#).call,
            Ok(Call::Build {})
        );
        for (text, why) in [
            ("just words", "no tool call"),
            ("<|query_tool|>", "no JSON object"),
            ("<|query_tool|>{\"tool\": ", "not JSON"),
            ("<|query_tool|>[1]", "JSON object"),
            (
                r#"<|query_tool|>{"tool": "opne"}"#,
                "unknown variant `opne`",
            ),
            (r#"<|query_tool|>{"tool": "open"}"#, "missing field `path`"),
            (
                r#"<|query_tool|>{"tool": "build", "x": 1}"#,
                "unknown field `x`",
            ),
            (
                r#"<|query_tool|>{"tool": "build"} {"tool": "test"}"#,
                "one call per turn",
            ),
        ] {
            let e = parse(text).call.unwrap_err();
            assert!(e.contains(why), "{text}: {e}");
        }
    }
}
