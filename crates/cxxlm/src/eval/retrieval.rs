//! Retrieval at length: a function of a held-out file is defined at the start of the
//! context, other code follows for a given number of tokens, and the function's head is
//! written again at the end. A model that reads back that far writes the body it saw;
//! one that does not can only guess it from the head, which the same prompt with the
//! definition left out measures.

use anyhow::{bail, Result};
use clap::Args;
use cxxlm_pack::{Manifest, Packer};
use cxxlm_tokenizer::Bpe;
use serde_json::json;
use std::path::PathBuf;

use super::{Generation, Healed, ModelArgs, TextModel};
use crate::cli::special;

#[derive(Args)]
pub struct RetrievalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The output directory of `cxxlm pack`: functions and the code between come from
    /// its validation split.
    #[arg(long)]
    pub pack: PathBuf,
    /// Functions to ask for, at most one per document.
    #[arg(long, default_value_t = 64)]
    pub functions: usize,
    /// Tokens of other code between the definition and its head written again.
    #[arg(long, value_delimiter = ',', default_value = "256,1024,4096")]
    pub distances: Vec<usize>,
    /// Tokens of the body the model has to write back.
    #[arg(long, default_value_t = 16)]
    pub tokens: usize,
    /// Prompts generated together.
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// A function of a document: its head, through the line that opens its body, and the
/// body up to its closing brace.
struct Function {
    doc: usize,
    head: String,
    body: String,
}

/// The results at one distance (`None`: the definition left out).
#[derive(Debug, PartialEq)]
struct Row {
    distance: Option<usize>,
    asked: usize,
    /// Prompts left out: longer than the model's context (or too little other code).
    left_out: usize,
    /// The body's first tokens written back exactly.
    copied: usize,
    /// Mean share of those tokens' text written before the first difference.
    prefix_share: f64,
}

/// A function of `text` whose body starts on the line after its `{` and holds at least
/// two lines of code; the head starts after the previous blank line, `;` or `}` within
/// 300 bytes. Documents differ in which one they give (`doc` picks).
fn pick_function(text: &str, doc: usize) -> Option<(String, String)> {
    let found: Vec<(String, String)> = cxxlm_eval::functions::function_bodies(text)
        .into_iter()
        .filter_map(|b| {
            let (open, close) = (b.open, b.close);
            if text.as_bytes().get(open) != Some(&b'\n') {
                return None;
            }
            let body = &text[open + 1..close];
            if body.trim().len() < 40 || body.lines().count() < 2 || body.lines().count() > 40 {
                return None;
            }
            let floor = text.floor_char_boundary(open.saturating_sub(300));
            let before = &text[floor..open];
            let start = ["\n\n", ";\n", "}\n"]
                .iter()
                .filter_map(|sep| before.rfind(sep).map(|i| floor + i + sep.len()))
                .max()?;
            let head = &text[start..open + 1];
            head.contains('(')
                .then(|| (head.to_string(), body.to_string()))
        })
        .collect();
    (!found.is_empty()).then(|| found[(doc * 7919) % found.len()].clone())
}

/// `n` tokens of the documents after `skip`, in order and wrapping around, each ended by a
/// blank line; `None` when the others hold fewer.
fn filler(docs: &[Vec<u32>], skip: usize, n: usize) -> Option<Vec<u32>> {
    let mut out = Vec::with_capacity(n);
    for i in (1..docs.len()).map(|k| (skip + k) % docs.len()) {
        if out.len() >= n {
            break;
        }
        out.extend(&docs[i][..docs[i].len().min(n - out.len())]);
    }
    (out.len() == n).then_some(out)
}

/// A function as its prompts use it, encoded once: the definition, the head written
/// again (after a blank line: the other code before it may end within a line), and the
/// text of the body's first tokens, which the model has to write back.
struct Pieces {
    doc: usize,
    definition: Vec<u32>,
    head: Vec<u32>,
    want: String,
}

impl Pieces {
    fn new(bpe: &Bpe, f: &Function, tokens: usize) -> Self {
        let body = bpe.encode(&f.body);
        Pieces {
            doc: f.doc,
            definition: bpe.encode(&format!("{}{}}}\n\n", f.head, f.body)),
            head: bpe.encode(&format!("\n\n{}", f.head)),
            want: String::from_utf8_lossy(&bpe.decode(&body[..body.len().min(tokens)]))
                .into_owned(),
        }
    }
}

/// The prompt with `distance` tokens between the definition and its head, or (`None`)
/// with other code in the definition's place, as long as the longest distance's.
fn prompt(
    bpe: &Bpe,
    f: &Pieces,
    encoded: &[Vec<u32>],
    distance: Option<usize>,
    longest: usize,
) -> Option<Vec<u32>> {
    let mut ids = vec![special(bpe, "<|bos|>")];
    match distance {
        Some(d) => {
            ids.extend(&f.definition);
            ids.extend(filler(encoded, f.doc, d)?);
        }
        None => ids.extend(filler(encoded, f.doc, f.definition.len() + longest)?),
    }
    ids.extend(&f.head);
    Some(ids)
}

fn measure(
    model: &dyn TextModel,
    functions: &[Function],
    encoded: &[Vec<u32>],
    args: &RetrievalArgs,
) -> Vec<Row> {
    let bpe = model.tokenizer();
    let longest = args.distances.iter().copied().max().unwrap_or(0);
    let slack = 8;
    let pieces: Vec<Pieces> = functions
        .iter()
        .map(|f| Pieces::new(bpe, f, args.tokens))
        .collect();
    let distances = args.distances.iter().map(|&d| Some(d)).chain([None]);
    let mut rows = Vec::new();
    for distance in distances {
        let asked: Vec<(Vec<u32>, &str)> = pieces
            .iter()
            .filter_map(|f| {
                let ids = prompt(bpe, f, encoded, distance, longest)?;
                (ids.len() + args.tokens + slack <= model.context())
                    .then_some((ids, f.want.as_str()))
            })
            .collect();
        let (mut copied, mut shares) = (0, 0.0);
        // The head ends where its body opens, where a token may go on across the line.
        let healed = Healed::new(bpe, asked.iter().map(|(p, _)| p.clone()).collect());
        let generation = Generation {
            max_new_tokens: args.tokens + slack,
            first_tokens: healed.first_tokens(),
            slots: args.batch.max(1),
            ..Default::default()
        };
        let out = model.generate(&healed.prompts, &generation, &mut |_, _| false);
        for (i, ((_, want), row)) in asked.iter().zip(out).enumerate() {
            let written = healed.text(bpe, i, &row);
            copied += usize::from(written.starts_with(want));
            let same = written
                .bytes()
                .zip(want.bytes())
                .take_while(|(a, b)| a == b)
                .count();
            shares += same as f64 / want.len().max(1) as f64;
        }
        rows.push(Row {
            distance,
            asked: asked.len(),
            left_out: functions.len() - asked.len(),
            copied,
            prefix_share: shares / asked.len().max(1) as f64,
        });
    }
    rows
}

pub fn run(args: RetrievalArgs, model: &dyn TextModel) -> Result<()> {
    let bpe = model.tokenizer();
    let manifest = Manifest::load(&args.pack)?;
    manifest.check_tokenizer(&args.pack, bpe)?;
    let val = manifest.open(&args.pack, "val")?;
    let packer = Packer::new(bpe, manifest.settings.fim);
    let mut texts = Vec::new();
    for doc in 0..val.len() {
        if let Ok(text) = String::from_utf8(packer.restore(&val.doc(doc))?) {
            texts.push(text);
        }
    }
    let functions = functions_of(&texts, args.functions);
    if functions.is_empty() {
        bail!("no validation document has a function to ask for");
    }
    let encoded: Vec<Vec<u32>> = texts
        .iter()
        .map(|t| bpe.encode(&format!("{t}\n\n")))
        .collect();
    let rows = measure(model, &functions, &encoded, &args);
    crate::outln!(
        "retrieval: {} functions of {} documents, the body's first {} tokens written back",
        functions.len(),
        texts.len(),
        args.tokens
    )?;
    let mut report = Vec::new();
    for r in &rows {
        let at = match r.distance {
            Some(d) => format!("{d} tokens back"),
            None => "definition left out".into(),
        };
        crate::outln!(
            "  {at:<22} {} of {} copied ({:.1}%), {:.1}% of their text before the first difference; {} left out",
            r.copied,
            r.asked,
            100.0 * r.copied as f64 / r.asked.max(1) as f64,
            100.0 * r.prefix_share,
            r.left_out
        )?;
        report.push(json!({"distance": r.distance, "asked": r.asked, "left_out": r.left_out, "copied": r.copied,
            "copied_rate": r.copied as f64 / r.asked.max(1) as f64, "prefix_share": r.prefix_share}));
    }
    if let Some(path) = &args.json {
        let value = json!({"functions": functions.len(), "tokens": args.tokens, "rows": report});
        std::fs::write(path, serde_json::to_vec_pretty(&value)?)?;
    }
    Ok(())
}

/// At most `n` functions, one per document.
fn functions_of(texts: &[String], n: usize) -> Vec<Function> {
    texts
        .iter()
        .enumerate()
        .filter_map(|(doc, t)| {
            pick_function(t, doc).map(|(head, body)| Function { doc, head, body })
        })
        .take(n)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use cxxlm_serve::text::Layout;

    /// Continues a prompt by copying what followed the earlier place that ends most like
    /// it, within `reach` tokens of its end; with nothing to copy it writes `;`.
    struct Copier {
        bpe: Bpe,
        reach: usize,
    }

    impl TextModel for Copier {
        fn tokenizer(&self) -> &Bpe {
            &self.bpe
        }

        fn layout(&self) -> Layout {
            Layout {
                strip_indentation: true,
            }
        }

        fn context(&self) -> usize {
            4096
        }

        fn generate(
            &self,
            prompts: &[Vec<u32>],
            g: &Generation,
            _: &mut dyn FnMut(usize, &[u32]) -> bool,
        ) -> Vec<Vec<u32>> {
            let semicolon = self.bpe.encode(";")[0];
            prompts
                .iter()
                .map(|p| {
                    let n = p.len();
                    // The longest earlier match of the prompt's end (the latest of equals).
                    let found = (n.saturating_sub(self.reach)..n - 1)
                        .map(|end| {
                            (
                                (1..=end).take_while(|&k| p[end - k] == p[n - k]).count(),
                                end,
                            )
                        })
                        .filter(|&(len, _)| len > 0)
                        .max();
                    (0..g.max_new_tokens)
                        .map(|k| match found {
                            Some((_, end)) => p.get(end + k).copied().unwrap_or(semicolon),
                            None => semicolon,
                        })
                        .collect()
                })
                .collect()
        }
    }

    fn documents() -> Vec<String> {
        (0..12)
            .map(|i| {
                format!(
                    "#include <vector>\n\nstatic int helper_{i}(int a) {{\nreturn a * {i};\n}}\n\n\
                     int compute_{i}(const std::vector<int>& v) {{\nint total_{i} = 0;\n\
                     for (int x : v) total_{i} += helper_{i}(x) - {i};\nreturn total_{i} + {i};\n}}\n"
                )
            })
            .collect()
    }

    fn args(distances: Vec<usize>) -> RetrievalArgs {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            retrieval: RetrievalArgs,
        }
        let mut a = Cli::parse_from(["x", "--checkpoint", "c", "--pack", "p"]).retrieval;
        a.distances = distances;
        a.tokens = 8;
        a
    }

    #[test]
    fn a_model_that_reads_back_far_enough_writes_the_body_and_one_that_does_not_cannot() {
        let texts = documents();
        let bpe = super::super::tests::tokenizer(&texts.concat());
        let functions = functions_of(&texts, 8);
        assert_eq!(functions.len(), 8);
        assert!(functions
            .iter()
            .all(|f| f.head.ends_with("{\n") && f.body.ends_with(";\n")));
        let encoded: Vec<Vec<u32>> = texts
            .iter()
            .map(|t| bpe.encode(&format!("{t}\n\n")))
            .collect();
        let a = args(vec![20, 200]);

        // The distance is the tokens between the definition and its head written again.
        let f = &functions[0];
        let definition = bpe.encode(&format!("{}{}}}\n\n", f.head, f.body)).len();
        let head = bpe.encode(&format!("\n\n{}", f.head)).len();
        let pieces = Pieces::new(&bpe, f, 8);
        let near = prompt(&bpe, &pieces, &encoded, Some(20), 200).unwrap();
        assert_eq!(near.len(), 1 + definition + 20 + head);
        let without = prompt(&bpe, &pieces, &encoded, None, 200).unwrap();
        assert_eq!(without.len(), 1 + definition + 200 + head);

        let far_reader = Copier {
            bpe: bpe.clone(),
            reach: 4096,
        };
        let rows = measure(&far_reader, &functions, &encoded, &a);
        let copied: Vec<_> = rows
            .iter()
            .map(|r| (r.distance, r.asked, r.copied))
            .collect();
        assert_eq!(
            copied,
            vec![(Some(20), 8, 8), (Some(200), 8, 8), (None, 8, 0)]
        );
        assert!(rows[0].prefix_share == 1.0 && rows[2].prefix_share < 1.0);

        // One that sees only the last 150 tokens finds the definition 20 tokens back, not 200.
        let near_reader = Copier { bpe, reach: 150 };
        let rows = measure(&near_reader, &functions, &encoded, &a);
        let copied: Vec<_> = rows.iter().map(|r| r.copied).collect();
        assert_eq!(copied, vec![8, 0, 0]);
    }
}
