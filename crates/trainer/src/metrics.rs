//! Metrics a user can watch: `metrics.jsonl` (one object per logged step), TensorBoard event
//! files, and a progress bar with loss, tokens/s and ETA on a terminal (plain periodic lines
//! otherwise).

use std::fs::File;
use std::io::{IsTerminal, Write};
use std::path::Path;

use indicatif::{ProgressBar, ProgressStyle};
use tensorboard_rs::summary_writer::FileWriter;

pub const METRICS_FILE: &str = "metrics.jsonl";

/// Opens a JSON Lines log for appending. A resumed run (`start > 0`) keeps the lines whose
/// `key` (the step) is at most `start` and drops the rest, which a run killed after its last
/// checkpoint wrote; a fresh run starts the file empty.
pub fn reopen_jsonl(path: &Path, key: &str, start: usize) -> std::io::Result<File> {
    let kept: String = if start > 0 {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .filter(|line| {
                serde_json::from_str::<serde_json::Value>(line)
                    .ok()
                    .and_then(|v| v[key].as_u64())
                    .is_some_and(|s| (s as usize) <= start)
            })
            .map(|line| format!("{line}\n"))
            .collect()
    } else {
        String::new()
    };
    std::fs::write(path, kept)?;
    std::fs::OpenOptions::new().append(true).open(path)
}

/// A progress bar on stderr for `total` items of work before or between training steps (a
/// method's preparation, such as reference log-probabilities); none when stderr is not a
/// terminal.
pub fn work_bar(total: usize, message: &str) -> Option<ProgressBar> {
    std::io::stderr().is_terminal().then(|| {
        let bar = ProgressBar::new(total as u64);
        bar.set_style(
            ProgressStyle::with_template(
                "{bar:30} {pos}/{len} [{elapsed_precise} < {eta_precise}] {msg}",
            )
            .expect("valid progress template"),
        );
        bar.set_message(message.to_string());
        bar
    })
}

pub struct MetricsLogger {
    jsonl: File,
    tensorboard: FileWriter,
    bar: Option<ProgressBar>,
}

impl MetricsLogger {
    /// Opens `<dir>/metrics.jsonl` and TensorBoard files under `<dir>/tensorboard`. A resumed run
    /// (`start_step > 0`) keeps the log lines up to its checkpoint's step and appends after them.
    pub fn open(dir: &Path, start_step: usize, total_steps: usize) -> std::io::Result<Self> {
        let jsonl = reopen_jsonl(&dir.join(METRICS_FILE), "step", start_step)?;
        let tensorboard = FileWriter::new(dir.join("tensorboard"));
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
            tensorboard,
            bar,
        })
    }

    /// Writes one metrics line (`step` plus the values) and the TensorBoard scalars
    /// `<group>/<name>`; updates the bar, or prints a plain line when not on a terminal.
    pub fn log(&mut self, group: &str, step: usize, values: &[(&str, f64)]) -> std::io::Result<()> {
        let mut object = serde_json::Map::new();
        object.insert("step".into(), step.into());
        for (name, value) in values {
            object.insert((*name).into(), serde_json::json!(value));
            self.tensorboard.add_summary(
                tensorboard_rs::summary::scalar(&format!("{group}/{name}"), *value as f32),
                step,
            );
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

    /// Writes a text summary (TensorBoard's Text tab, markdown) under `tag`.
    pub fn text(&mut self, tag: &str, step: usize, markdown: &str) {
        self.tensorboard
            .add_summary(text_summary(tag, markdown), step);
        self.tensorboard.flush();
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

/// A summary TensorBoard's text plugin reads: a scalar string tensor tagged with plugin "text".
fn text_summary(tag: &str, markdown: &str) -> tensorboard_proto::summary::Summary {
    use tensorboard_proto::summary::{
        Summary, SummaryMetadata, SummaryMetadata_PluginData, Summary_Value,
    };
    use tensorboard_proto::tensor::TensorProto;
    use tensorboard_proto::tensor_shape::TensorShapeProto;
    use tensorboard_proto::types::DataType;

    let mut plugin = SummaryMetadata_PluginData::new();
    plugin.set_plugin_name("text".into());
    let mut metadata = SummaryMetadata::new();
    metadata.set_plugin_data(plugin);
    let mut tensor = TensorProto::new();
    tensor.set_dtype(DataType::DT_STRING);
    tensor.set_tensor_shape(TensorShapeProto::new());
    tensor.set_string_val(protobuf::RepeatedField::from_vec(vec![markdown
        .as_bytes()
        .to_vec()]));
    let mut value = Summary_Value::new();
    value.set_tag(tag.into());
    value.set_metadata(metadata);
    value.set_tensor(tensor);
    let mut summary = Summary::new();
    summary.set_value(protobuf::RepeatedField::from_vec(vec![value]));
    summary
}

/// CPU seconds this process has run so far, all threads, user and system (0 where the OS does
/// not say): against wall-clock time, how many cores a phase kept busy.
pub fn cpu_seconds() -> f64 {
    #[cfg(unix)]
    {
        let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
        // SAFETY: getrusage writes one `rusage` into the pointer it is given.
        let read = unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) };
        if read == 0 {
            // SAFETY: initialised by the successful call (and zeroed before it).
            let usage = unsafe { usage.assume_init() };
            let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
            return seconds(usage.ru_utime) + seconds(usage.ru_stime);
        }
    }
    0.0
}

#[cfg(test)]
mod tests {
    /// The process's CPU time grows while a thread computes (within 30 s of wall time, so a
    /// loaded machine only slows the test down).
    #[test]
    fn cpu_seconds_count_the_work_done() {
        let before = super::cpu_seconds();
        let started = std::time::Instant::now();
        let mut x = 1u64;
        while super::cpu_seconds() - before < 0.05 {
            for _ in 0..100_000 {
                x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
            }
            assert!(
                started.elapsed().as_secs() < 30,
                "CPU time does not grow ({x})"
            );
        }
    }
}
