//! `pgate extract`, `pgate geometry` and `pgate directions`:
//! argument parsing and printing over `persona_gate::directions`.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};
use persona_gate::directions::{
    export_gguf_file, extract_trait_files, random_file, random_references, DirectionSet,
    ExportFlags, GeometryFlags, ImportFlags, RandomJob, TraitFiles, TraitSpec,
};

use crate::args::WithModel;
use crate::progress::Progress;
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
    Random(WithModel<RandomJob>),
    /// The refusal direction (Arditi et al. 2024): harmful-vs-harmless difference in means at every
    /// layer, selected by bypass / induce / KL scores on validation prompts.
    ///
    /// Example: pgate extract refusal q15 -o refusal.safetensors --n-train 64 --n-val 16
    Refusal(WithModel<persona_gate::refusal::RefusalFlags>),
}

#[derive(Args)]
pub struct TraitArgs {
    /// Built-in trait (compliant, evil, nurturing, callous, supportive, hostile, patient, arrogant,
    /// diplomatic) or a trait JSON file ({instruction: [{pos, neg}], questions: [...], eval_prompt}).
    #[arg(long = "trait", value_name = "NAME|FILE")]
    pub trait_name: String,
    #[command(flatten)]
    pub m: ModelArgs,
    #[command(flatten)]
    pub files: TraitFiles,
}

#[derive(Subcommand)]
pub enum DirectionsCmd {
    /// Write a direction file as a llama.cpp control vector (direction.N = output of block N).
    ///
    /// Example: pgate directions export-gguf compliant.safetensors -o compliant.gguf --unit --coeff 4
    ExportGguf(ExportFlags),
    /// Read a llama.cpp control vector into a direction file.
    ///
    /// Example: pgate directions import-gguf cv.gguf -o cv.safetensors --n-layers 24
    ImportGguf(ImportFlags),
    /// Print a direction file's metadata and per-layer norms.
    ///
    /// Example: pgate directions info compliant.safetensors
    Info { file: PathBuf },
}

pub fn run_extract(cmd: ExtractCmd) -> Result<()> {
    match cmd {
        ExtractCmd::Trait(a) => extract_trait_cmd(a),
        ExtractCmd::Refusal(a) => crate::refusal_cli::run_refusal(a),
        ExtractCmd::Random(a) => {
            let refs = random_references(&a.job)?;
            let model = a.m.load()?;
            println!("{}", random_file(&model, &a.job, &refs)?.summary());
            Ok(())
        }
    }
}

fn extract_trait_cmd(a: TraitArgs) -> Result<()> {
    let spec = TraitSpec::load(&a.trait_name)?;
    let opts = a.files.opts.options()?;
    let model = a.m.load()?;
    let outputs = a.files.outputs();
    let run = extract_trait_files(&model, &spec, &opts, &outputs, &mut Progress::new())?;
    print!("{}", run.summary());
    Ok(())
}

pub fn run_geometry(a: GeometryFlags) -> Result<()> {
    let report = a.report()?;
    print!("{}", report.to_table());
    Ok(a.write_files(&report)?)
}

pub fn run_directions(cmd: DirectionsCmd) -> Result<()> {
    match cmd {
        DirectionsCmd::ExportGguf(flags) => {
            let opts = flags.options()?;
            let e = export_gguf_file(&flags.input, &flags.out, &opts)?;
            for n in e.notes() {
                eprintln!("[pgate] {n}");
            }
            println!("{}", e.describe(&flags.out, &opts));
        }
        DirectionsCmd::ImportGguf(flags) => println!("{}", flags.run()?),
        DirectionsCmd::Info { file } => print!("{}", DirectionSet::load(&file)?.describe()),
    }
    Ok(())
}
