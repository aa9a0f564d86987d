use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use cxxlm_pack::indexed::paths;
use cxxlm_pack::{
    pack, FimConfig, IndexedDataset, Manifest, PackConfig, Packer, RepoConfig, SplitCounts, SPLITS,
};
use cxxlm_tokenizer::Bpe;
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct PackArgs {
    #[command(subcommand)]
    command: Option<PackCommand>,
    #[arg(long, required = true)]
    tokenizer: Option<PathBuf>,
    /// Shards of `cxxlm data run` or `data dedup` (directories or files), or any input
    /// `data run` reads. Repeatable.
    #[arg(long = "input", short, required = true)]
    inputs: Vec<String>,
    #[arg(long, short, required = true)]
    out: Option<PathBuf>,
    /// Share of training documents rearranged for fill-in-the-middle.
    #[arg(long, default_value_t = 0.5)]
    fim_rate: f64,
    /// Share of FIM documents in suffix-prefix-middle order (the rest prefix-suffix-middle).
    #[arg(long, default_value_t = 0.5)]
    fim_spm_rate: f64,
    /// Cut FIM spans at line starts only.
    #[arg(long)]
    fim_line_aligned: bool,
    /// Share of documents (chosen by a hash of their id; of repositories with
    /// `--repo-context`) kept for validation.
    #[arg(long, default_value_t = 0.01)]
    val_fraction: f64,
    /// Hold out file-level documents by their repository (the archive or checkout the data
    /// stage read them from, else their folder) instead of their id: the repositories a
    /// `--repo-context` pack of the same data holds out, held out whole.
    #[arg(long)]
    val_by_repository: bool,
    /// Repository-level examples of at most this many tokens: each repository's files,
    /// headers before their includers, as `<|repo_name|>name` then `<|file_sep|>path`
    /// and the code per file.
    #[arg(long)]
    repo_context: Option<usize>,
    /// With `--repo-context`: the share of repositories (by a hash of the name) packed
    /// file by file instead, keeping short documents in the mix.
    #[arg(long, default_value_t = 0.0, requires = "repo_context")]
    repo_file_share: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Subcommand)]
enum PackCommand {
    /// Counts, FIM statistics, token checks and decoded samples of a pack, or of one
    /// `.bin/.idx` pair.
    Inspect {
        /// A pack directory, or a `.bin`, `.idx` or their common prefix.
        path: PathBuf,
        /// Defaults to the tokenizer recorded in the pack's `pack.json`.
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        /// Characters of each decoded sample to print.
        #[arg(long, default_value_t = 400)]
        sample_chars: usize,
    },
}

pub fn run(args: PackArgs) -> Result<()> {
    if let Some(PackCommand::Inspect {
        path,
        tokenizer,
        sample_chars,
    }) = args.command
    {
        return inspect(&path, tokenizer, sample_chars);
    }
    let (Some(tokenizer), Some(out)) = (args.tokenizer, args.out) else {
        bail!("--tokenizer and --out are required");
    };
    let bpe = cxxlm_tokenizer::load(&tokenizer)?;
    let config = PackConfig {
        inputs: args.inputs,
        out,
        fim: FimConfig {
            rate: args.fim_rate,
            spm_rate: args.fim_spm_rate,
            line_aligned: args.fim_line_aligned,
            seed: args.seed,
        },
        val_fraction: args.val_fraction,
        val_by_repository: args.val_by_repository,
        repo: args.repo_context.map(|context| RepoConfig {
            context,
            file_share: args.repo_file_share,
        }),
        batch_bytes: 16 << 20,
    };
    let started = Instant::now();
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = ProgressBar::new_spinner();
        bar.set_style(ProgressStyle::with_template("packing {msg} ({elapsed})").expect("template"));
        bar
    });
    let manifest = pack(&bpe, &tokenizer, &config, &|bytes, docs| {
        if let Some(bar) = &bar {
            bar.set_message(format!("{docs} documents, {:.1} MB", bytes as f64 / 1e6));
        }
    })?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let seconds = started.elapsed().as_secs_f64();
    let bytes: u64 = ["train", "val"]
        .iter()
        .map(|s| manifest.splits[*s].text_bytes)
        .sum();
    print_splits(&manifest)?;
    for (reason, n) in &manifest.skipped {
        outln!("skipped {n} inputs: {reason}")?;
    }
    outln!(
        "{:.1} MB of text in {seconds:.1}s ({:.1} MB/s): {}",
        bytes as f64 / 1e6,
        bytes as f64 / 1e6 / seconds.max(1e-9),
        config.out.display()
    )?;
    if manifest.splits["val"].documents == 0 {
        let whole = match manifest.settings.repo.is_some() || manifest.settings.val_by_repository {
            true => " (whole repositories are held out: with few of them, none may be)",
            false => "",
        };
        eprintln!(
            "warning: no validation documents{whole}; raise --val-fraction for a corpus this small"
        );
    }
    Ok(())
}

fn print_splits(manifest: &Manifest) -> Result<()> {
    outln!(
        "{:<8} {:>10} {:>13} {:>13} {:>8} {:>8} {:>8}",
        "split",
        "documents",
        "tokens",
        "text bytes",
        "bytes/t",
        "PSM",
        "SPM"
    )?;
    for split in SPLITS {
        let c: &SplitCounts = &manifest.splits[split];
        outln!(
            "{split:<8} {:>10} {:>13} {:>13} {:>8.3} {:>8} {:>8}",
            c.documents,
            c.tokens,
            c.text_bytes,
            c.text_bytes as f64 / c.tokens.max(1) as f64,
            c.fim_psm,
            c.fim_spm
        )?;
    }
    Ok(())
}

fn inspect(path: &Path, tokenizer: Option<PathBuf>, sample_chars: usize) -> Result<()> {
    let (dir, files): (PathBuf, Vec<PathBuf>) = if path.is_dir() {
        (
            path.to_path_buf(),
            SPLITS.iter().map(|s| path.join(s)).collect(),
        )
    } else {
        let (bin, _) = paths(path);
        let dir = bin.parent().unwrap_or(Path::new(".")).to_path_buf();
        (dir, vec![bin])
    };
    let manifest = Manifest::load(&dir).ok();
    let tokenizer = tokenizer
        .or_else(|| manifest.as_ref().map(|m| PathBuf::from(&m.tokenizer_path)))
        .context("no pack.json beside the file names its tokenizer; pass --tokenizer")?;
    let bpe = cxxlm_tokenizer::load(&tokenizer)?;
    if let Some(m) = &manifest {
        m.check_tokenizer(&dir, &bpe)?;
        outln!("{}: {:?}", Manifest::path(&dir).display(), m.settings.fim)?;
        if let Some(repo) = &m.settings.repo {
            outln!("repository examples: {repo:?}")?;
        }
        print_splits(m)?;
    }
    for file in files {
        let ds = IndexedDataset::open(&file)?;
        inspect_one(&ds, &bpe, sample_chars)?;
    }
    Ok(())
}

fn inspect_one(ds: &IndexedDataset, bpe: &Bpe, sample_chars: usize) -> Result<()> {
    let packer = Packer::new(bpe, FimConfig::default());
    let s = packer.specials;
    let (mut psm, mut spm, mut unframed, mut out_of_vocab) = (0u64, 0u64, 0u64, 0u64);
    let (mut shortest, mut longest) = (usize::MAX, 0);
    let (mut plain_sample, mut fim_sample, mut repo_sample) = (None, None, None);
    let mut repo_examples = 0u64;
    for i in 0..ds.len() {
        let doc = ds.doc(i);
        if doc.contains(&s.repo_name) {
            repo_examples += 1;
            if repo_sample.is_none() {
                repo_sample = Some(doc.clone());
            }
        }
        shortest = shortest.min(doc.len());
        longest = longest.max(doc.len());
        out_of_vocab += doc
            .iter()
            .filter(|&&t| t as usize >= bpe.vocab_size())
            .count() as u64;
        if doc.first() != Some(&s.bos) || doc.last() != Some(&s.eos) {
            unframed += 1;
        }
        match (doc.get(1), doc.get(2)) {
            (Some(&p), Some(&x)) if p == s.prefix && x == s.suffix => spm += 1,
            (Some(&p), _) if p == s.prefix => psm += 1,
            _ => {}
        }
        let slot = if doc.get(1) == Some(&s.prefix) {
            &mut fim_sample
        } else {
            &mut plain_sample
        };
        if slot.is_none() {
            *slot = Some(doc);
        }
    }
    outln!(
        "\n{}: {:?}, {} documents, {} tokens, lengths {}..{} (mean {:.0}); FIM {} ({} in SPM order or with an empty prefix)",
        ds.path().display(),
        ds.token_type(),
        ds.len(),
        ds.total_tokens(),
        if ds.is_empty() { 0 } else { shortest },
        longest,
        ds.total_tokens() as f64 / ds.len().max(1) as f64,
        psm + spm,
        spm
    )?;
    if repo_examples > 0 {
        outln!("{repo_examples} repository examples")?;
    }
    if unframed > 0 || out_of_vocab > 0 {
        bail!(
            "{}: {unframed} documents lack <|bos|>/<|eos|>, {out_of_vocab} tokens are outside the vocabulary of {}: packed with another tokenizer?",
            ds.path().display(),
            bpe.vocab_size()
        );
    }
    if let Some(doc) = repo_sample {
        let (name, files) = packer.restore_repository(&doc)?;
        outln!(
            "--- a repository example ({} tokens): {name}, {} files in order ---",
            doc.len(),
            files.len()
        )?;
        for (path, code) in &files {
            outln!("  {path} ({} bytes)", code.len())?;
        }
    }
    for doc in [plain_sample, fim_sample].into_iter().flatten() {
        let text = String::from_utf8_lossy(&bpe.decode(&doc)).into_owned();
        let cut: String = text.chars().take(sample_chars).collect();
        outln!("--- sample ({} tokens) ---\n{cut}", doc.len())?;
        if doc.get(1) == Some(&s.prefix) {
            let restored = packer.restore(&doc)?;
            let head: String = String::from_utf8_lossy(&restored)
                .chars()
                .take(sample_chars)
                .collect();
            outln!("--- rearranged back ---\n{head}")?;
        }
    }
    Ok(())
}
