//! Metrics a user can watch: `metrics.jsonl` (one object per logged step), TensorBoard event
//! files, and a progress bar with loss, tokens/s and ETA on a terminal (plain periodic lines
//! otherwise).

use std::fs::File;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

use indicatif::{ProgressBar, ProgressStyle};
use tensorboard_rs::summary_writer::SummaryWriter;

pub struct MetricsLogger {
    jsonl: File,
    path: PathBuf,
    tensorboard: SummaryWriter,
    bar: Option<ProgressBar>,
}

impl MetricsLogger {
    /// Opens `<dir>/metrics.jsonl` and TensorBoard files under `<dir>/tensorboard`. A resumed run
    /// (`start_step > 0`) keeps the log lines up to its checkpoint's step and appends after them.
    pub fn open(dir: &Path, start_step: usize, total_steps: usize) -> std::io::Result<Self> {
        let path = dir.join("metrics.jsonl");
        let kept: String = if start_step > 0 {
            std::fs::read_to_string(&path)
                .unwrap_or_default()
                .lines()
                .filter(|line| {
                    serde_json::from_str::<serde_json::Value>(line)
                        .ok()
                        .and_then(|v| v["step"].as_u64())
                        .is_some_and(|s| (s as usize) <= start_step)
                })
                .map(|line| format!("{line}\n"))
                .collect()
        } else {
            String::new()
        };
        std::fs::write(&path, kept)?;
        let jsonl = std::fs::OpenOptions::new().append(true).open(&path)?;
        let tensorboard = SummaryWriter::new(dir.join("tensorboard"));
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(total_steps as u64);
            bar.set_style(
                ProgressStyle::with_template(
                    "{bar:30} {pos}/{len} [{elapsed_precise} < {eta_precise}] {msg}",
                )
                .expect("valid progress template"),
            );
            bar.set_position(start_step as u64);
            bar
        });
        Ok(Self {
            jsonl,
            path,
            tensorboard,
            bar,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes one metrics line (`step` plus the values) and the TensorBoard scalars
    /// `<group>/<name>`; updates the bar, or prints a plain line when not on a terminal.
    pub fn log(&mut self, group: &str, step: usize, values: &[(&str, f64)]) -> std::io::Result<()> {
        let mut object = serde_json::Map::new();
        object.insert("step".into(), step.into());
        for (name, value) in values {
            object.insert((*name).into(), serde_json::json!(value));
            self.tensorboard
                .add_scalar(&format!("{group}/{name}"), *value as f32, step);
        }
        writeln!(self.jsonl, "{}", serde_json::Value::Object(object))?;
        self.jsonl.flush()?;
        self.tensorboard.flush();
        let text = values
            .iter()
            .map(|(name, value)| format!("{name} {}", short(*value)))
            .collect::<Vec<_>>()
            .join("  ");
        match &self.bar {
            Some(bar) if group == "train" => bar.set_message(text),
            Some(bar) => bar.println(format!("step {step}  {text}")),
            None => eprintln!("step {step}  {text}"),
        }
        Ok(())
    }

    /// Moves the progress bar to `step` optimizer steps done.
    pub fn progress(&self, step: usize) {
        if let Some(bar) = &self.bar {
            bar.set_position(step as u64);
        }
    }

    pub fn finish(&mut self) {
        self.tensorboard.flush();
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}

fn short(value: f64) -> String {
    let magnitude = value.abs();
    if magnitude != 0.0 && !(1e-2..1e5).contains(&magnitude) {
        format!("{value:.3e}")
    } else {
        format!("{value:.4}")
    }
}
