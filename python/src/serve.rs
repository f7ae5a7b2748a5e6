//! `pgate serve` from Python: the OpenAI-compatible server of persona-gate-serve, run until its
//! process gets SIGINT/SIGTERM.
//!
//! Why the Python side runs this in a child process (`persona_gate.serve.start`): the server owns
//! its model and runs until a signal, so a child process is what makes "stop" exact (its memory
//! and threads go with it) without a binary on the PATH.

use std::io::Write;
use std::path::PathBuf;

use persona_gate::events::Event;
use persona_gate_serve::ops::{serve_blocking, RequestFlags, ServeOptions, ServeSetup};
use pyo3::prelude::*;

use crate::errors::IntoPy;

/// Load `model` and serve it on `host:port` until SIGINT/SIGTERM; prints
/// `listening on http://HOST:PORT` on stdout once it accepts requests.
#[pyfunction]
#[pyo3(signature = (model, host = "127.0.0.1", port = 8080, dtype = "q", presets = None, directions = Vec::new(), max_batch = 32, api_key = None))]
#[allow(clippy::too_many_arguments)]
pub fn serve_forever(
    py: Python<'_>,
    model: String,
    host: &str,
    port: u16,
    dtype: &str,
    presets: Option<PathBuf>,
    directions: Vec<PathBuf>,
    max_batch: usize,
    api_key: Option<String>,
) -> PyResult<()> {
    let setup = ServeSetup::prepare(ServeOptions {
        model_id: model.clone(),
        presets,
        directions,
        guard: None,
        guard_file: None,
        output_guard: "off".into(),
        probe: None,
        output_guard_every: 0,
        output_guard_batch: 4,
        persona_direction: "compliant".into(),
        refusal_direction: "refusal".into(),
        window: 4,
        requests: RequestFlags {
            max_tokens: 1024,
            default_max_tokens: 256,
            max_prompt_tokens: 4096,
            timeout_s: 300,
            body_timeout_s: 30.0,
            max_connections: 256,
            header_timeout_s: 10.0,
        },
        queue: 64,
        max_batch,
        api_key,
        public_metrics: false,
    })
    .py_err()?;
    let opts = persona_gate::model::LoadOptions {
        dtype: persona_gate::model::DTypeMode::parse(dtype).py_err()?,
        ..Default::default()
    };
    py.detach(|| {
        let m = persona_gate::model::Model::load(&model, &opts).py_err()?;
        let mut log = |e: Event| {
            if let Event::Note(s) | Event::Warning(s) = e {
                eprintln!("[persona_gate serve] {s}");
            }
        };
        let cfg = setup.build(&m, &mut log).py_err()?;
        serve_blocking(m, cfg, host, port, &mut log, |addr| {
            println!("listening on http://{addr}");
            let _ = std::io::stdout().flush();
        })
        .py_err()
    })
}
