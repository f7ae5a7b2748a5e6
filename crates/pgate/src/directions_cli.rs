//! `pgate extract`, `pgate geometry`, `pgate directions` and the steering flags of `pgate generate`:
//! argument parsing and printing over `persona_gate::directions`.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use persona_gate::directions::capture::CaptureOptions;
use persona_gate::directions::{
    export_control_vector, extract_trait, import_control_vector, random_directions, DirectionSet,
    ExportOptions, GeometryReport, Method, Position, RandomOptions, TraitOptions, TraitSpec,
};
use persona_gate::generate::Sampling;
use persona_gate::intervene::LayerSet;

use crate::ModelArgs;

#[derive(Subcommand)]
pub enum ExtractCmd {
    /// Persona vector of a trait (Chen et al. 2025): answers under the trait's positive vs negative
    /// system prompts, residual averaged over the answer (or read at the prompt), difference in means
    /// at every layer.
    ///
    /// Example: pgate extract trait --trait compliant q05 -o compliant.safetensors --max-questions 10
    Trait(TraitArgs),
    /// Seeded random control directions, optionally orthogonal to and norm-matched with a direction.
    ///
    /// Example: pgate extract random q05 --seed 7 --like refusal.safetensors --orthogonal-to refusal.safetensors -o rand7.safetensors
    Random(RandomArgs),
    /// The refusal direction (Arditi et al. 2024): harmful-vs-harmless difference in means at every
    /// layer, selected by bypass / induce / KL scores on validation prompts.
    ///
    /// Example: pgate extract refusal q15 -o refusal.safetensors --n-train 64 --n-val 16
    Refusal(crate::refusal_cli::RefusalArgs),
}

#[derive(Args)]
pub struct TraitArgs {
    /// Built-in trait (compliant, evil, nurturing, callous, supportive, hostile, patient, arrogant,
    /// diplomatic) or a trait JSON file ({instruction: [{pos, neg}], questions: [...], eval_prompt}).
    #[arg(long = "trait", value_name = "NAME|FILE")]
    pub trait_name: String,
    #[command(flatten)]
    pub m: ModelArgs,
    /// Output direction file (.safetensors).
    #[arg(short, long)]
    pub out: PathBuf,
    /// Where to read activations: response (mean over the answer), last (last prompt token),
    /// post-instruction (mean over the template tokens after the question), or -K (K-th prompt
    /// token from the end).
    #[arg(long, default_value = "response", allow_hyphen_values = true)]
    pub position: String,
    /// diff-in-means, or pca-paired (first principal component of paired differences).
    #[arg(long, default_value = "diff-in-means")]
    pub method: String,
    /// Use only the first N questions.
    #[arg(long)]
    pub max_questions: Option<usize>,
    /// Use only the first N instruction pairs.
    #[arg(long)]
    pub max_pairs: Option<usize>,
    /// New tokens per answer (response position).
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Sampling temperature of the answers (0 = greedy).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Also write the activations: PREFIX.pos.safetensors and PREFIX.neg.safetensors ([layers, n, d]).
    #[arg(long, value_name = "PREFIX")]
    pub save_activations: Option<PathBuf>,
    /// Write the answers (JSONL: side, system, question, answer) here.
    #[arg(long)]
    pub responses: Option<PathBuf>,
    /// Do not hash the model file when no sha256 sidecar exists.
    #[arg(long)]
    pub no_hash: bool,
}

#[derive(Args)]
pub struct RandomArgs {
    #[command(flatten)]
    pub m: ModelArgs,
    #[arg(long)]
    pub seed: u64,
    /// Output direction file (.safetensors).
    #[arg(short, long)]
    pub out: PathBuf,
    /// Match this direction's norm at every layer (unit vectors otherwise).
    #[arg(long)]
    pub like: Option<PathBuf>,
    /// Make every layer's vector orthogonal to this direction's vector at that layer.
    #[arg(long)]
    pub orthogonal_to: Option<PathBuf>,
}

/// `pgate geometry`.
#[derive(Args)]
pub struct GeometryArgs {
    /// Direction files (.safetensors) from the same model.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// Write the long-form table (kind,a,b,layer_a,layer_b,value) here.
    #[arg(long)]
    pub csv: Option<PathBuf>,
    /// Write the report as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Also compare each direction across all pairs of layers.
    #[arg(long)]
    pub all_layers: bool,
}

#[derive(Subcommand)]
pub enum DirectionsCmd {
    /// Write a direction file as a llama.cpp control vector (direction.N = output of block N).
    ///
    /// Example: pgate directions export-gguf compliant.safetensors -o compliant.gguf --unit --coeff 4
    ExportGguf {
        input: PathBuf,
        #[arg(short, long)]
        out: PathBuf,
        /// Multiply the vectors by this.
        #[arg(long, default_value_t = 1.0)]
        coeff: f32,
        /// Export unit vectors (times --coeff) instead of the raw ones.
        #[arg(long)]
        unit: bool,
        /// Only these layers (e.g. 10-16); llama.cpp never steers layer 0.
        #[arg(long)]
        layers: Option<String>,
    },
    /// Read a llama.cpp control vector into a direction file.
    ///
    /// Example: pgate directions import-gguf cv.gguf -o cv.safetensors --n-layers 24
    ImportGguf {
        input: PathBuf,
        #[arg(short, long)]
        out: PathBuf,
        /// Number of model layers (default: from the file, else the highest direction.N + 1).
        #[arg(long)]
        n_layers: Option<usize>,
    },
    /// Print a direction file's metadata and per-layer norms.
    ///
    /// Example: pgate directions info compliant.safetensors
    Info { file: PathBuf },
}

fn progress_bar(total: u64, what: &str) -> indicatif::ProgressBar {
    let b = indicatif::ProgressBar::new(total);
    b.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{{bar:40}} {{pos}}/{{len}} {what}  {{elapsed_precise}} eta {{eta}}"
        ))
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    b
}

pub fn run_extract(cmd: ExtractCmd) -> Result<()> {
    match cmd {
        ExtractCmd::Trait(a) => extract_trait_cmd(a),
        ExtractCmd::Refusal(a) => crate::refusal_cli::run_refusal(a),
        ExtractCmd::Random(a) => {
            let load = |p: &Option<PathBuf>| -> Result<Option<DirectionSet>> {
                p.as_ref()
                    .map(|p| DirectionSet::load(p).map_err(anyhow::Error::from))
                    .transpose()
            };
            let like = load(&a.like)?;
            let orth = load(&a.orthogonal_to)?;
            let model = a.m.load()?;
            let cfg = model.config();
            let mut set = random_directions(
                cfg.n_layers,
                cfg.d_model,
                &RandomOptions {
                    seed: a.seed,
                    orthogonal_to: orth.as_ref(),
                    like: like.as_ref(),
                },
            )?;
            set.meta = set.meta.clone().with_model(&model, false);
            set.save(&a.out)?;
            let norms = set.norms();
            println!(
                "wrote {}: random-gaussian seed {}, {} layers x {}{}{}; norms {:.3}..{:.3}",
                a.out.display(),
                a.seed,
                cfg.n_layers,
                cfg.d_model,
                orth.as_ref()
                    .map(|o| format!(", orthogonal to {}", o.name()))
                    .unwrap_or_default(),
                like.as_ref()
                    .map(|o| format!(", norm-matched to {}", o.name()))
                    .unwrap_or_default(),
                norms.iter().cloned().fold(f64::INFINITY, f64::min),
                norms.iter().cloned().fold(0.0, f64::max),
            );
            Ok(())
        }
    }
}

fn extract_trait_cmd(a: TraitArgs) -> Result<()> {
    let spec = TraitSpec::load(&a.trait_name)?;
    let position = Position::parse(&a.position)?;
    let method = Method::parse(&a.method)?;
    let opts = TraitOptions {
        position,
        method,
        max_questions: a.max_questions,
        max_pairs: a.max_pairs,
        capture: CaptureOptions {
            batch_size: a.batch_size,
            max_new_tokens: a.max_tokens,
            sampling: Sampling {
                temperature: a.temperature,
                top_p: a.top_p,
                seed: a.seed,
            },
        },
        hash_model: !a.no_hash,
    };
    opts.capture.sampling.validate()?;
    let model = a.m.load()?;
    let n_pairs = a
        .max_pairs
        .unwrap_or(usize::MAX)
        .min(spec.instruction.len());
    let n_q = a
        .max_questions
        .unwrap_or(usize::MAX)
        .min(spec.questions.len());
    let total = 2 * n_pairs * n_q;
    eprintln!(
        "[pgate] trait {} ({}): {n_pairs} instruction pairs x {n_q} questions x 2 sides = {total} prompts, position {position}",
        spec.name, spec.source
    );
    let t0 = std::time::Instant::now();
    let bar = progress_bar(
        total as u64,
        if position == Position::Response {
            "answers"
        } else {
            "prompts"
        },
    );
    let ex = extract_trait(&model, &spec, &opts, |_, done, _| {
        bar.set_position(done as u64)
    })?;
    bar.finish_and_clear();
    ex.set.save(&a.out)?;
    if let Some(prefix) = &a.save_activations {
        let with = |suffix: &str| {
            let mut s = prefix.clone().into_os_string();
            s.push(suffix);
            PathBuf::from(s)
        };
        ex.pos.save(&with(".pos.safetensors"))?;
        ex.neg.save(&with(".neg.safetensors"))?;
    }
    if let Some(path) = &a.responses {
        let mut f = std::io::BufWriter::new(
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
        );
        for (side, acts, prompts) in [
            ("pos", &ex.pos, &ex.pos_prompts),
            ("neg", &ex.neg, &ex.neg_prompts),
        ] {
            let Some(answers) = &acts.responses else {
                continue;
            };
            for ((p, ans), n) in prompts.iter().zip(answers).zip(&acts.counts) {
                let line = serde_json::json!({
                    "side": side, "id": p.id, "system": p.system, "question": p.user,
                    "answer": ans, "tokens_averaged": n,
                });
                writeln!(f, "{line}")?;
            }
        }
        f.flush()?;
    }
    let sep = ex.separation();
    let norms = ex.set.norms();
    println!(
        "wrote {}: trait {}, {} on {}, position {}, {} + {} prompts, {:.1}s",
        a.out.display(),
        spec.name,
        ex.set.meta.method,
        model.info.name,
        position,
        ex.set.meta.n_pos,
        ex.set.meta.n_neg,
        t0.elapsed().as_secs_f64()
    );
    println!(
        "{:>5} {:>10} {:>12} {:>12}",
        "layer", "|v|", "proj(pos)", "proj(neg)"
    );
    let f = |x: Option<f64>| x.map(|x| format!("{x:.3}")).unwrap_or_else(|| "-".into());
    for (l, (n, (p, q))) in norms.iter().zip(sep).enumerate() {
        println!("{l:>5} {n:>10.3} {:>12} {:>12}", f(p), f(q));
    }
    Ok(())
}

pub fn run_geometry(a: GeometryArgs) -> Result<()> {
    let sets = a
        .files
        .iter()
        .map(|p| DirectionSet::load(p).map_err(anyhow::Error::from))
        .collect::<Result<Vec<_>>>()?;
    let refs: Vec<&DirectionSet> = sets.iter().collect();
    let report = GeometryReport::new(&refs, a.all_layers)?;
    print!("{}", report.to_table());
    if let Some(p) = &a.csv {
        std::fs::write(p, report.to_csv()).with_context(|| format!("writing {}", p.display()))?;
    }
    if let Some(p) = &a.json {
        std::fs::write(p, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

pub fn run_directions(cmd: DirectionsCmd) -> Result<()> {
    match cmd {
        DirectionsCmd::ExportGguf {
            input,
            out,
            coeff,
            unit,
            layers,
        } => {
            let set = DirectionSet::load(&input)?;
            let layers = layers.map(|l| LayerSet::parse(&l)).transpose()?;
            let s = export_control_vector(
                &set,
                &out,
                &ExportOptions {
                    coeff,
                    unit,
                    layers,
                },
            )?;
            if s.skipped_layer0 {
                eprintln!("[pgate] note: layer 0 left out (llama.cpp control vectors start at the output of block 1)");
            }
            if !s.skipped_zero.is_empty() {
                eprintln!("[pgate] note: zero layers left out: {:?}", s.skipped_zero);
            }
            println!(
                "wrote {}: control vector '{}' for {} ({} layers: {}..={}), coeff {coeff}{}",
                out.display(),
                set.name(),
                if set.meta.architecture.is_empty() {
                    "unknown"
                } else {
                    &set.meta.architecture
                },
                s.layers.len(),
                s.layers.first().copied().unwrap_or(0),
                s.layers.last().copied().unwrap_or(0),
                if unit { ", unit vectors" } else { "" }
            );
            Ok(())
        }
        DirectionsCmd::ImportGguf {
            input,
            out,
            n_layers,
        } => {
            let set = import_control_vector(&input, n_layers)?;
            set.save(&out)?;
            println!(
                "wrote {}: '{}', {} layers x {} (layers present: {})",
                out.display(),
                set.name(),
                set.n_layers(),
                set.d_model(),
                set.meta
                    .extra
                    .get("layers_present")
                    .map(String::as_str)
                    .unwrap_or("?")
            );
            Ok(())
        }
        DirectionsCmd::Info { file } => {
            let set = DirectionSet::load(&file)?;
            let m = &set.meta;
            println!("name           {}", m.name);
            println!("shape          {} layers x {}", m.n_layers, m.d_model);
            println!("model          {} ({})", m.model, m.architecture);
            if let Some(h) = &m.model_sha256 {
                println!("model sha256   {h}");
            }
            println!("method         {}", m.method);
            println!("position       {}", m.position);
            println!("prompts        {} pos, {} neg", m.n_pos, m.n_neg);
            if let Some(h) = &m.prompt_set_sha256 {
                println!("prompt sha256  {h}");
            }
            if let Some(s) = m.seed {
                println!("seed           {s}");
            }
            println!("created        {} by pgate {}", m.created, m.tool_version);
            for (k, v) in &m.extra {
                println!("extra          {k} = {v}");
            }
            let pp = set.pos_mean.as_ref().map(|x| set.projections(x));
            let pn = set.neg_mean.as_ref().map(|x| set.projections(x));
            println!(
                "{:>5} {:>10} {:>12} {:>12}",
                "layer", "|v|", "proj(pos)", "proj(neg)"
            );
            let f = |x: Option<&Vec<Option<f64>>>, l: usize| {
                x.and_then(|v| v[l])
                    .map(|x| format!("{x:.3}"))
                    .unwrap_or_else(|| "-".into())
            };
            for (l, n) in set.norms().iter().enumerate() {
                println!(
                    "{l:>5} {n:>10.3} {:>12} {:>12}",
                    f(pp.as_ref(), l),
                    f(pn.as_ref(), l)
                );
            }
            Ok(())
        }
    }
}
