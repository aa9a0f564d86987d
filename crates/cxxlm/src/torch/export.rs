//! `cxxlm export hf`: a checkpoint as a transformers `NanoChatForCausalLM` (our
//! architecture: weight-less RMSNorm after the embedding, before each sub-layer and
//! the head; rotary then per-head RMSNorm on queries and keys; relu^2 MLP; untied head;
//! tanh logit softcap), checked for logit parity through transformers itself.

use anyhow::{bail, Context, Result};
use cxxlm::cli::{prompt_ids, ExportHfArgs};
use cxxlm::outln;
use cxxlm_model::{Activation, Gpt, ModelConfig};
use cxxlm_tokenizer::chat::{self, Message, Role};
use cxxlm_tokenizer::layout::Layout;
use cxxlm_tokenizer::Bpe;
use serde_json::{json, Value};
use std::path::Path;
use tch::{Device, Kind, Tensor};

use crate::sample::load_checkpoint;

const PARITY_SCRIPT: &str = include_str!("hf_parity.py");

/// Logits may differ by float rounding only (fp32 on both sides).
const PARITY_TOLERANCE: f64 = 1e-3;

/// The transformers name of each of our tensors, or why the model cannot be exported.
fn hf_name(name: &str) -> Option<String> {
    Some(match name {
        "wte" => "model.embed_tokens.weight".into(),
        "lm_head" => "lm_head.weight".into(),
        _ => {
            let rest = name.strip_prefix("blocks.")?;
            let (layer, part) = rest.split_once('.')?;
            let slot = match part {
                "attn.q" => "self_attn.q_proj",
                "attn.k" => "self_attn.k_proj",
                "attn.v" => "self_attn.v_proj",
                "attn.proj" => "self_attn.o_proj",
                "mlp.fc" => "mlp.fc1",
                "mlp.proj" => "mlp.fc2",
                _ => return None,
            };
            format!("model.layers.{layer}.{slot}.weight")
        }
    })
}

/// Refuses what `NanoChatForCausalLM` cannot express exactly.
fn check_expressible(c: &ModelConfig) -> Result<()> {
    if c.activation != Activation::Relu2 {
        bail!("this model's MLP is SwiGLU; NanoChatForCausalLM's is fc1 -> relu^2 -> fc2 with no gate, so it cannot hold it (refused rather than converted lossily)");
    }
    if c.rope_scaling.is_some() {
        bail!("this model's rotary is scaled by YaRN; transformers' YaRN ramps over dimension indices rather than over YaRN's rotations per context, and puts its temperature into cos and sin, which NanoChat's QK-norm after the rotary cancels, so it would compute another function (refused rather than converted lossily)");
    }
    Ok(())
}

fn config_json(c: &ModelConfig, bpe: &Bpe) -> Value {
    let id = |n: &str| bpe.special_id(n);
    json!({
        "architectures": ["NanoChatForCausalLM"],
        "model_type": "nanochat",
        "vocab_size": c.vocab_size,
        "hidden_size": c.width,
        "intermediate_size": c.hidden(),
        "num_hidden_layers": c.depth,
        "num_attention_heads": c.heads,
        "num_key_value_heads": c.kv_heads,
        "head_dim": c.head_dim(),
        "max_position_embeddings": c.seq_len,
        "hidden_act": "relu2",
        // torch's rms_norm without eps uses the float32 epsilon, as our norms do.
        "rms_norm_eps": f32::EPSILON as f64,
        "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_base},
        "final_logit_softcapping": c.softcap,
        "attention_bias": false,
        "attention_dropout": 0.0,
        "tie_word_embeddings": false,
        "bos_token_id": id("<|bos|>"),
        "eos_token_id": id("<|eos|>"),
        "pad_token_id": id("<|pad|>"),
        "dtype": "float32",
        "use_cache": true,
    })
}

fn tokenizer_config(c: &ModelConfig, bpe: &Bpe, layout: Layout) -> Value {
    let specials: Vec<String> = cxxlm_tokenizer::SPECIALS
        .iter()
        .map(|s| s.to_string())
        .collect();
    json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|bos|>",
        "eos_token": "<|eos|>",
        "pad_token": "<|pad|>",
        "add_bos_token": false,
        "add_eos_token": false,
        "clean_up_tokenization_spaces": false,
        "model_max_length": c.seq_len,
        "additional_special_tokens": specials[3..],
        "fim_prefix_token": "<|fim_prefix|>",
        "fim_middle_token": "<|fim_middle|>",
        "fim_suffix_token": "<|fim_suffix|>",
        "file_separator_token": "<|file_sep|>",
        "repo_name_token": "<|repo_name|>",
        "chat_template": chat::template(layout),
        "vocab_size": bpe.vocab_size(),
    })
}

/// A conversation for the chat template's check: indented code with CRLF line ends and
/// trailing spaces, a tool's answer.
fn parity_chat() -> Vec<Message> {
    vec![
        Message::new(Role::System, "Fix the bug.  "),
        Message::new(Role::User, "int f(int x) {\r\n    return x\r\n}\n"),
        Message::new(Role::Assistant, "int f(int x) {\n\treturn x;  \n}"),
        Message::new(Role::Tool, "    1  int f(int x) {\n"),
    ]
}

/// Fixed prompts for the parity check: plain code, and a FIM layout.
fn parity_prompts(bpe: &Bpe) -> Vec<(String, Vec<u32>)> {
    let code = "#include <vector>\n\nint sum(const std::vector<int>& v) {\nint total = 0;\nfor (int x : v) {\ntotal += x;\n}\nreturn total;\n}\n";
    let mut prompts: Vec<(String, Vec<u32>)> = [
        code,
        "template <typename T>\nT max_of(T a, T b) {\n",
        "namespace io {\nstruct File;\n",
    ]
    .iter()
    .map(|t| (t.to_string(), prompt_ids(bpe, t, None)))
    .collect();
    let fim = prompt_ids(bpe, "", Some(("int f(int x) {\n", "\n}\n")));
    prompts.push((String::new(), fim));
    prompts
}

fn write_json(path: &Path, value: &Value) -> Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(value)? + "\n")
        .with_context(|| format!("writing {}", path.display()))
}

/// Runs transformers on the export and compares its logits with ours.
fn parity(dir: &Path, model: &Gpt, bpe: &Bpe, layout: Layout, python: &str) -> Result<Value> {
    let prompts = parity_prompts(bpe);
    let chat = parity_chat();
    let chat_ids = chat::prompt(bpe, &chat, layout);
    let chat: Vec<Value> = chat
        .iter()
        .map(|m| json!({"role": m.role.name(), "content": m.content}))
        .collect();
    let scratch = tempfile_dir(dir)?;
    let script = scratch.join("hf_parity.py");
    std::fs::write(&script, PARITY_SCRIPT)?;
    let prompts_path = scratch.join("prompts.json");
    let ids: Vec<&Vec<u32>> = prompts.iter().map(|(_, ids)| ids).collect();
    // The FIM prompt holds specials, which text does not make: its tokens are not compared.
    let texts: Vec<&str> = prompts.iter().map(|(t, _)| t.as_str()).collect();
    write_json(
        &prompts_path,
        &json!({"ids": ids, "texts": texts, "chat": chat}),
    )?;
    let logits_path = scratch.join("logits.f32");
    let out = std::process::Command::new(python)
        .arg(&script)
        .arg(dir)
        .arg(&prompts_path)
        .arg(&logits_path)
        .output()
        .with_context(|| {
            format!("running {python} for the parity check (--python, or --no-parity)")
        })?;
    if !out.status.success() {
        bail!(
            "transformers could not run the export (needs transformers >= 5; --python picks the interpreter):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let report: Value = serde_json::from_slice(
        out.stdout
            .split(|&b| b == b'\n')
            .rfind(|l| !l.is_empty())
            .unwrap_or(b"{}"),
    )
    .context("reading the parity script's report")?;
    let bytes = std::fs::read(&logits_path)?;
    let theirs: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let vocab = model.config.vocab_size as i64;
    let mut offset = 0usize;
    let mut max_diff = 0f64;
    let mut greedy_equal = true;
    let mut positions = 0usize;
    for (_, ids) in &prompts {
        let idx =
            Tensor::from_slice(&ids.iter().map(|&t| t as i64).collect::<Vec<_>>()).unsqueeze(0);
        let ours = model
            .forward_logits(&idx)
            .squeeze_dim(0)
            .to_kind(Kind::Float);
        let n = ids.len() * vocab as usize;
        let slice = theirs
            .get(offset..offset + n)
            .context("transformers wrote fewer logits than asked")?;
        offset += n;
        let theirs_t = Tensor::from_slice(slice).view([ids.len() as i64, vocab]);
        max_diff = max_diff.max((&ours - &theirs_t).abs().max().double_value(&[]));
        greedy_equal &= ours.argmax(-1, false).equal(&theirs_t.argmax(-1, false));
        positions += ids.len();
    }
    let tokens_equal = report["tokens_equal"].as_array().is_some_and(|a| {
        a.iter()
            .zip(&prompts)
            .all(|(v, (t, _))| t.is_empty() || v == &json!(true))
    });
    let chat_equal = report["chat_ids"] == json!(chat_ids);
    let passed = max_diff <= PARITY_TOLERANCE && greedy_equal && tokens_equal && chat_equal;
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(json!({
        "passed": passed,
        "prompts": prompts.len(),
        "positions": positions,
        "max_abs_logit_diff": max_diff,
        "tolerance": PARITY_TOLERANCE,
        "greedy_tokens_equal": greedy_equal,
        "tokenizer_ids_equal": tokens_equal,
        "chat_template_ids_equal": chat_equal,
        "transformers": report["transformers"],
        "class": report["class"],
        "tokenizer_class": report["tokenizer_class"],
    }))
}

fn tempfile_dir(beside: &Path) -> Result<std::path::PathBuf> {
    let dir = beside.with_extension(format!("parity-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

pub fn hf(args: ExportHfArgs) -> Result<()> {
    let (model, bpe) = load_checkpoint(&args.checkpoint, args.tokenizer.as_deref())?;
    let model = if model.device() == Device::Cpu {
        model
    } else {
        // The export and its check are fp32 on the CPU, as transformers loads it.
        let (m, _) = cxxlm_train::checkpoint::load_model(&args.checkpoint, Device::Cpu)?;
        m
    };
    let c = &model.config;
    check_expressible(c)?;
    let layout = crate::serve::layout(&args.checkpoint, "auto");
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for (name, t) in model.params() {
        let hf = hf_name(name).with_context(|| {
            format!("tensor {name} has no slot in NanoChatForCausalLM; refused")
        })?;
        tensors.push((hf, t.detach().to_kind(Kind::Float).contiguous()));
    }
    let out = &args.out;
    let tmp = out.with_extension("partial");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    Tensor::write_safetensors(&tensors, tmp.join("model.safetensors"))
        .context("writing model.safetensors")?;
    write_json(&tmp.join("config.json"), &config_json(c, &bpe))?;
    let id = |n: &str| bpe.special_id(n);
    write_json(
        &tmp.join("generation_config.json"),
        &json!({"bos_token_id": id("<|bos|>"), "eos_token_id": id("<|eos|>"), "pad_token_id": id("<|pad|>"), "max_length": c.seq_len}),
    )?;
    write_json(
        &tmp.join("tokenizer.json"),
        &cxxlm_tokenizer::to_hf_json(&bpe),
    )?;
    write_json(
        &tmp.join("tokenizer_config.json"),
        &tokenizer_config(c, &bpe, layout),
    )?;
    write_json(
        &tmp.join("special_tokens_map.json"),
        &json!({"bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>"}),
    )?;
    let report = if args.no_parity {
        json!({"passed": null, "skipped": "--no-parity"})
    } else {
        parity(&tmp, &model, &bpe, layout, &args.python)?
    };
    write_json(&tmp.join("parity.json"), &report)?;
    if report["passed"] == json!(false) {
        bail!(
            "parity check failed (the export is left in {} for inspection): {report}",
            tmp.display()
        );
    }
    if out.exists() {
        std::fs::remove_dir_all(out).with_context(|| format!("replacing {}", out.display()))?;
    }
    std::fs::rename(&tmp, out)?;
    match args.no_parity {
        true => outln!("{}: written, not checked (--no-parity)", out.display()),
        false => outln!(
            "{}: NanoChatForCausalLM; parity through transformers {}: max |logit difference| {:.2e} over {} positions, greedy tokens equal: {}, tokenizer ids equal: {}, chat template ids equal: {} (parity.json)",
            out.display(),
            report["transformers"].as_str().unwrap_or("?"),
            report["max_abs_logit_diff"].as_f64().unwrap_or(f64::NAN),
            report["positions"],
            report["greedy_tokens_equal"],
            report["tokenizer_ids_equal"],
            report["chat_template_ids_equal"],
        ),
    }?;
    Ok(())
}
