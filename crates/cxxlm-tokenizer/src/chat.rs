//! The chat template, one for fine-tuning, serving and exported models:
//!
//! ```text
//! <|bos|>{role}\n{content}<|eos|>{role}\n{content}<|eos|>...
//! ```
//!
//! with roles `system`, `user` and `assistant`, and `tool` for what a tool answered,
//! whose header is the special `<|tool_result|>` instead of `tool\n`. A prompt for the
//! next answer ends with `assistant\n`, and the answer ends at `<|eos|>`. The texts are
//! encoded as text: a special token's spelling inside them stays text, except the agent's
//! markers in assistant turns ([`AGENT_MARKERS`]: thoughts and tool calls, which the model
//! writes itself). A model learns each assistant turn's content and its `<|eos|>`, so that
//! it learns to stop; the `assistant\n` before it is the prompt's. Each content is laid
//! out as the model's training text was ([`layout`](crate::layout)), so that code in a
//! turn reads as code did in pretraining.

use crate::layout::{normalize, Layout};
use crate::Bpe;

/// [`prompt`]'s template in Jinja, for `tokenizer_config.json`: each content laid out as
/// [`normalize`] does, for a model of `layout`.
pub fn template(layout: Layout) -> String {
    let line = match layout.strip_indentation {
        true => r"line.rstrip(' \t\x0b\x0c').lstrip(' \t')",
        false => r"line.rstrip(' \t\x0b\x0c')",
    };
    // Lines are joined by an expression: a newline right after a block tag would be
    // dropped by transformers' `trim_blocks`.
    let content = format!(
        r"{{% for line in m['content'].replace('\r\n', '\n').replace('\r', '\n').split('\n') %}}{{% if not loop.first %}}{{{{ '\n' }}}}{{% endif %}}{{{{ {line} }}}}{{% endfor %}}"
    );
    format!("<|bos|>{{% for m in messages %}}{{% if m['role'] == 'tool' %}}<|tool_result|>{{% else %}}{{{{ m['role'] }}}}\n{{% endif %}}{content}<|eos|>{{% endfor %}}{{% if add_generation_prompt %}}assistant\n{{% endif %}}")
}

/// Specials an assistant turn may hold as tokens: `<|thought_start|>` reasoning
/// `<|thought_end|>`, then `<|query_tool|>` and a call (`cxxlm-agent` reads it).
pub const AGENT_MARKERS: [&str; 3] = ["<|thought_start|>", "<|thought_end|>", "<|query_tool|>"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    System,
    User,
    Assistant,
    Tool,
}

impl Role {
    /// `system`, `user` or `assistant`.
    pub fn parse(name: &str) -> Option<Role> {
        match name {
            "system" => Some(Role::System),
            "user" => Some(Role::User),
            "assistant" => Some(Role::Assistant),
            "tool" => Some(Role::Tool),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub role: Role,
    pub content: String,
}

impl Message {
    pub fn new(role: Role, content: impl Into<String>) -> Message {
        Message {
            role,
            content: content.into(),
        }
    }
}

/// A conversation that gives nothing to learn from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChatError {
    #[error("the conversation holds no assistant message to learn from")]
    NoAnswer,
    #[error("the conversation ends with a {0} message, after its last answer")]
    EndsWith(&'static str),
}

/// The template's token ids of a conversation ending with an assistant turn, and which of
/// them a model learns (`true`: the assistant turns' contents and their `<|eos|>`).
pub fn render(
    bpe: &Bpe,
    messages: &[Message],
    layout: Layout,
) -> Result<(Vec<u32>, Vec<bool>), ChatError> {
    match messages.last() {
        None => return Err(ChatError::NoAnswer),
        Some(m) if m.role != Role::Assistant => {
            return Err(match messages.iter().any(|m| m.role == Role::Assistant) {
                true => ChatError::EndsWith(m.role.name()),
                false => ChatError::NoAnswer,
            })
        }
        _ => {}
    }
    let eos = end_of_turn(bpe);
    let mut ids = vec![bos(bpe)];
    let mut learned = vec![false];
    for m in messages {
        let header = header(bpe, m.role);
        learned.extend(std::iter::repeat_n(false, header.len()));
        ids.extend(header);
        let content = content(bpe, m, layout);
        let learn = m.role == Role::Assistant;
        learned.extend(std::iter::repeat_n(learn, content.len() + 1));
        ids.extend(content);
        ids.push(eos);
    }
    Ok((ids, learned))
}

/// The ids that ask for the next assistant turn: the conversation, then `assistant\n`.
pub fn prompt(bpe: &Bpe, messages: &[Message], layout: Layout) -> Vec<u32> {
    let eos = end_of_turn(bpe);
    let mut ids = vec![bos(bpe)];
    for m in messages {
        ids.extend(header(bpe, m.role));
        ids.extend(content(bpe, m, layout));
        ids.push(eos);
    }
    ids.extend(header(bpe, Role::Assistant));
    ids
}

/// The ids of a message's `{role}\n` (`<|tool_result|>` for a tool's). The tokenizer
/// splits its input into lines before merging, so these ids and the content's are those
/// of the whole `{role}\n{content}`.
pub fn header(bpe: &Bpe, role: Role) -> Vec<u32> {
    match role {
        Role::Tool => vec![special(bpe, "<|tool_result|>")],
        _ => bpe.encode(&format!("{}\n", role.name())),
    }
}

/// A message's content, laid out: text, but for [`AGENT_MARKERS`] in an assistant turn.
fn content(bpe: &Bpe, m: &Message, layout: Layout) -> Vec<u32> {
    let text = normalize(&m.content, layout);
    if m.role != Role::Assistant {
        return bpe.encode(&text);
    }
    let mut ids = Vec::new();
    let mut rest = text.as_str();
    while let Some((at, marker)) = AGENT_MARKERS
        .iter()
        .filter_map(|k| rest.find(k).map(|at| (at, *k)))
        .min()
    {
        ids.extend(bpe.encode(&rest[..at]));
        ids.push(special(bpe, marker));
        rest = &rest[at + marker.len()..];
    }
    ids.extend(bpe.encode(rest));
    ids
}

/// The id that ends a turn (where generation stops).
pub fn end_of_turn(bpe: &Bpe) -> u32 {
    special(bpe, "<|eos|>")
}

fn bos(bpe: &Bpe) -> u32 {
    special(bpe, "<|bos|>")
}

fn special(bpe: &Bpe, name: &str) -> u32 {
    bpe.special_id(name)
        .expect("the chat template's tokens are specials of every tokenizer")
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEEP: Layout = Layout {
        strip_indentation: false,
    };

    fn bpe() -> Bpe {
        let texts: Vec<String> = (0..20)
            .map(|i| format!("user\nint f{i}() {{ return {i}; }}\nassistant\n"))
            .collect();
        let mut t = crate::Trainer::new(512).unwrap();
        t.feed(&texts);
        t.train().unwrap()
    }

    #[test]
    fn assistant_turns_and_their_end_are_learned_and_specials_in_text_stay_text() {
        let bpe = bpe();
        let conv = [
            Message::new(Role::System, "Fix the bug."),
            Message::new(Role::User, "int f() { return 0 }"),
            Message::new(Role::Assistant, "int f() { return 0; }"),
            Message::new(Role::User, "<|eos|> again"),
            Message::new(Role::Assistant, "done"),
        ];
        let (ids, learned) = render(&bpe, &conv, KEEP).unwrap();
        assert_eq!(ids.len(), learned.len());
        let text = String::from_utf8(bpe.decode(&ids)).unwrap();
        assert_eq!(
            text,
            "<|bos|>system\nFix the bug.<|eos|>user\nint f() { return 0 }<|eos|>assistant\nint f() { return 0; }<|eos|>user\n<|eos|> again<|eos|>assistant\ndone<|eos|>"
        );
        // Each message's ids are those of its whole `role\ncontent`.
        let whole = bpe.encode("user\nint f() { return 0 }");
        let mut split = header(&bpe, Role::User);
        split.extend(bpe.encode("int f() { return 0 }"));
        assert_eq!(whole, split);
        // The literal `<|eos|>` in the user's text is text, not the special.
        let eos = end_of_turn(&bpe);
        let ends: Vec<usize> = (0..ids.len()).filter(|&i| ids[i] == eos).collect();
        assert_eq!(ends.len(), 5);
        let learned_ids: Vec<u32> = ids
            .iter()
            .zip(&learned)
            .filter(|(_, &l)| l)
            .map(|(&t, _)| t)
            .collect();
        let learned_text = String::from_utf8(bpe.decode(&learned_ids)).unwrap();
        assert_eq!(learned_text, "int f() { return 0; }<|eos|>done<|eos|>");

        // A prompt is the conversation so far, then `assistant\n`: what the answer
        // follows in training.
        let p = prompt(&bpe, &conv[..4], KEEP);
        let answer_at = ids.len() - bpe.encode("done").len() - 1;
        assert_eq!(p, ids[..answer_at]);
    }

    #[test]
    fn agent_markers_are_tokens_in_answers_only_and_tool_turns_open_with_their_special() {
        let bpe = bpe();
        let call = "<|thought_start|>look<|thought_end|><|query_tool|>{\"tool\": \"build\"}";
        let conv = [
            Message::new(Role::User, "<|query_tool|> is text here"),
            Message::new(Role::Assistant, call),
            Message::new(Role::Tool, "ok <|thought_end|>"),
            Message::new(Role::Assistant, "done"),
        ];
        let (ids, _) = render(&bpe, &conv, KEEP).unwrap();
        let id = |s: &str| bpe.special_id(s).unwrap();
        let count = |t: u32| ids.iter().filter(|&&i| i == t).count();
        assert_eq!(count(id("<|query_tool|>")), 1);
        assert_eq!(count(id("<|thought_start|>")), 1);
        assert_eq!(count(id("<|thought_end|>")), 1);
        assert_eq!(count(id("<|tool_result|>")), 1);
        assert_eq!(
            String::from_utf8(bpe.decode(&ids)).unwrap(),
            format!("<|bos|>user\n<|query_tool|> is text here<|eos|>assistant\n{call}<|eos|><|tool_result|>ok <|thought_end|><|eos|>assistant\ndone<|eos|>")
        );
        assert_eq!(Role::parse("tool"), Some(Role::Tool));
    }

    #[test]
    fn a_conversation_without_a_last_answer_is_named() {
        let bpe = bpe();
        let u = |s: &str| Message::new(Role::User, s);
        let a = |s: &str| Message::new(Role::Assistant, s);
        assert_eq!(render(&bpe, &[], KEEP), Err(ChatError::NoAnswer));
        assert_eq!(render(&bpe, &[u("x")], KEEP), Err(ChatError::NoAnswer));
        assert_eq!(
            render(&bpe, &[u("x"), a("y"), u("z")], KEEP),
            Err(ChatError::EndsWith("user"))
        );
        assert!(render(&bpe, &[a("y")], KEEP).is_ok());
    }

    #[test]
    fn every_turn_is_laid_out_as_the_training_text_was() {
        let bpe = bpe();
        let strip = Layout {
            strip_indentation: true,
        };
        let conv = [
            Message::new(Role::User, "int f() {\r\n    return 0  \n}"),
            Message::new(Role::Assistant, "int f() {\n\treturn 0;\n}\n"),
        ];
        let (ids, _) = render(&bpe, &conv, strip).unwrap();
        assert_eq!(
            String::from_utf8(bpe.decode(&ids)).unwrap(),
            "<|bos|>user\nint f() {\nreturn 0\n}<|eos|>assistant\nint f() {\nreturn 0;\n}\n<|eos|>"
        );
        let (kept, _) = render(&bpe, &conv, KEEP).unwrap();
        assert!(String::from_utf8(bpe.decode(&kept))
            .unwrap()
            .contains("{\n    return 0\n}<|eos|>assistant\nint f() {\n\treturn 0;"));
        assert_eq!(
            prompt(&bpe, &conv[..1], strip),
            ids[..ids.len() - bpe.encode("int f() {\nreturn 0;\n}\n").len() - 1]
        );
    }
}
