//! `bpo loop --config loop.toml --out DIR`: BPO in rounds ([`bpo::rounds`]). The config's sections are the stages'
//! own command lines: every `key = value` of `[train]` is `bpo train --key value` (underscores for dashes), parsed
//! by that command's own options, so each stage takes exactly the options, defaults and ranges its command has.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{ArgAction, FromArgMatches};
use serde::Deserialize;

use bpo::eval::suite::SuiteConfig;
use bpo::rounds::{self, Eval, Inject, Next, Outcome, Plan, Weaken};

use super::bootstrap::{InjectArgs, WeakenArgs};
use super::eval::suite::SuiteArgs;
use super::pairs::PairsArgs;
use super::{train, ModelArgs};

/// Options of the subcommand (its help text is on the `Command` variant).
#[derive(clap::Args)]
pub struct Args {
    /// The loop (TOML): rounds, the starting model, the data, and one section per stage ([weaken], [inject],
    /// [pairs], [train], [eval]) whose keys are that command's flags. docs/train.md has an example.
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
    /// Output folder: loop.json, round-0/ (the starting model's evaluation), round-1/ ... (each round's records,
    /// pairs, run folder, merged model and evaluation) and rounds.txt. Run the same command again to continue a
    /// run that was stopped or killed.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
}

/// The config file: the loop's own keys and the stages' sections.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LoopFile {
    rounds: usize,
    model: PathBuf,
    data: PathBuf,
    images: PathBuf,
    #[serde(default)]
    format: Option<String>,
    #[serde(default)]
    first_turn_only: bool,
    #[serde(default)]
    next: Next,
    weaken: Option<toml::Table>,
    inject: Option<toml::Table>,
    #[serde(default)]
    pairs: toml::Table,
    #[serde(default)]
    train: toml::Table,
    eval: Option<toml::Table>,
}

/// The keys of `bpo eval suite`'s config, given inline in `[eval]`.
const SUITE_KEYS: [&str; 7] = ["batch_size", "judge", "pope", "object_halbench", "mmvet", "llava_bench", "mmhal"];

/// The stages parsed: their commands' own argument structs.
struct Stages {
    weaken: Option<WeakenArgs>,
    inject: Option<InjectArgs>,
    pairs: PairsArgs,
    train: train::Args,
    eval: Option<(SuiteArgs, SuiteConfig)>,
}

pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let text = std::fs::read_to_string(&a.config).with_context(|| format!("reading {}", a.config.display()))?;
    let table: toml::Table = toml::from_str(&text).map_err(|e| config_error(&a.config, "", e.message()))?;
    // Everything but the number of rounds decides a round's files: a finished loop may be given more rounds.
    let mut settings = serde_json::to_value(&table)?;
    settings.as_object_mut().map(|s| s.remove("rounds"));
    let file: LoopFile = table.try_into().map_err(|e: toml::de::Error| config_error(&a.config, "", e.message()))?;
    bpo::range::check(&format!("{}: rounds", a.config.display()), file.rounds, bpo::range::at_least_one)?;
    let base = a.config.parent().unwrap_or(Path::new("."));
    let top = |p: &Path| base.join(p);
    let (model, data, images) = (top(&file.model), top(&file.data), top(&file.images));
    let stages = parse_stages(&file, &a.config, &a.out, [&model, &data, &images])?;
    let input = bpo::data::InputOptions {
        format: <bpo::data::InputFormat as clap::ValueEnum>::from_str(file.format.as_deref().unwrap_or("auto"), false)
            .map_err(|e| config_error(&a.config, "", &format!("format: {e}")))?,
        first_turn_only: file.first_turn_only,
    };
    let weaken_load = stages.weaken.as_ref().map(|w| loader(w.model()));
    let eval_load = stages.eval.as_ref().map(|(e, _)| loader(e.model()));
    let inject_llm = stages
        .inject
        .as_ref()
        .map(|i| move |policy: &Path| i.completer_for(policy).map_err(|e| bpo::Error::invalid(super::error_line(&e))));
    let plan = Plan {
        rounds: file.rounds,
        model,
        data,
        input,
        next: file.next,
        weaken: stages.weaken.as_ref().zip(weaken_load.as_ref()).map(|(w, l)| Weaken { options: w.options(), load: l }),
        inject: match (&stages.inject, &inject_llm) {
            (Some(i), Some(llm)) => Some(Inject { options: i.options()?, llm }),
            _ => None,
        },
        pairs: stages.pairs.options(),
        train: stages.train.config()?,
        eval: stages
            .eval
            .as_ref()
            .zip(eval_load.as_ref())
            .map(|((_, suite), l)| Eval { suite: suite.clone(), load: l }),
        settings,
    };
    train::catch_stop_signals();
    match rounds::run(&plan, &a.out, Some(&train::STOP), &super::bars(), &mut bpo::progress::Silent)? {
        Outcome::Done(table) => {
            if !table.is_empty() {
                outln!("\n{table}");
            }
            outln!("wrote {}", a.out.display());
            Ok(ExitCode::SUCCESS)
        }
        Outcome::Stopped { round } => {
            errln!("stopped in round {round}; run the same command again to continue");
            Ok(train::stopped())
        }
    }
}

/// Loads a model folder as `args` load theirs.
fn loader(args: &ModelArgs) -> impl Fn(&Path) -> bpo::Result<bpo::model::Vlm> + '_ {
    move |dir: &Path| {
        let m = ModelArgs { model: dir.to_path_buf(), ..args.clone() };
        m.load().map_err(|e| bpo::Error::invalid(super::error_line(&e)))
    }
}

/// Each section as its command's arguments, with the paths the loop sets (the first round's, replaced each round).
fn parse_stages(
    file: &LoopFile,
    config: &Path,
    out: &Path,
    [model, data, images]: [&Path; 3],
) -> anyhow::Result<Stages> {
    let p = |p: &Path| p.display().to_string();
    let round = out.join("round-1");
    let at = |name: &str| p(&round.join(name));
    let (model, data, images) = (p(model), p(data), p(images));
    let section = Section { config, base: config.parent().unwrap_or(Path::new(".")) };
    let weaken = match &file.weaken {
        Some(t) => Some(section.parse::<WeakenArgs>(
            "bootstrap weaken",
            "weaken",
            t,
            &[("model", &model), ("data", &data), ("images", &images), ("out", &at("weaken.jsonl"))],
            &["format", "first_turn_only", "adapter", "shard"],
        )?),
        None => None,
    };
    let inject = match &file.inject {
        Some(t) => Some(section.parse::<InjectArgs>(
            "bootstrap inject",
            "inject",
            t,
            &[("data", &data), ("out", &at("records.jsonl"))],
            &["format", "first_turn_only", "shard"],
        )?),
        None => None,
    };
    let pairs = section.parse::<PairsArgs>(
        "pairs",
        "pairs",
        &file.pairs,
        &[("records", &data), ("out", &at("pairs.jsonl"))],
        &[],
    )?;
    let train = section.parse::<train::Args>(
        "train",
        "train",
        &file.train,
        &[("model", &model), ("data", &at("pairs.jsonl")), ("images", &images), ("out", &at("train"))],
        &["resume", "init_adapter", "adapter"],
    )?;
    let eval = match &file.eval {
        Some(t) => Some(eval_stage(&section, t, &model, &round)?),
        None => None,
    };
    Ok(Stages { weaken, inject, pairs, train, eval })
}

/// `[eval]`: `bpo eval suite`'s flags, and its suite inline (the keys of a suite.toml) or as `config = FILE`.
fn eval_stage(
    section: &Section,
    t: &toml::Table,
    model: &str,
    round: &Path,
) -> anyhow::Result<(SuiteArgs, SuiteConfig)> {
    let (inline, flags): (toml::Table, toml::Table) =
        t.clone().into_iter().partition(|(k, _)| SUITE_KEYS.contains(&k.as_str()));
    if !inline.is_empty() && flags.contains_key("config") {
        bail!(
            "{}: [eval] has both config and a suite of its own ({}): give one",
            section.config.display(),
            SUITE_KEYS.join(", ")
        );
    }
    let (config, out) = (section.config.display().to_string(), round.join("eval").display().to_string());
    let mut set = vec![("model", model), ("out", out.as_str())];
    if !flags.contains_key("config") {
        set.push(("config", &config));
    }
    let args = section.parse::<SuiteArgs>("eval suite", "eval", &flags, &set, &["adapter"])?;
    let suite = match flags.contains_key("config") {
        true => SuiteConfig::load(args.config())?,
        false => SuiteConfig::from_table(inline, section.config)?,
    };
    Ok((args, suite))
}

/// A section of the config file turned into a command line.
struct Section<'a> {
    config: &'a Path,
    /// Relative paths are relative to the config's folder.
    base: &'a Path,
}

impl Section<'_> {
    /// `table` as the arguments of `bpo COMMAND` (parsed by `T`, that command's own options), with `set` (flags the
    /// loop gives) added; the keys of `set` and `refused` may not be in the table.
    fn parse<T: clap::Args + FromArgMatches>(
        &self,
        command: &str,
        name: &str,
        table: &toml::Table,
        set: &[(&str, &str)],
        refused: &[&str],
    ) -> anyhow::Result<T> {
        let cmd = T::augment_args(clap::Command::new("bpo").no_binary_name(true));
        let mut argv = Vec::new();
        for (key, value) in table {
            if set.iter().any(|(k, _)| k == key) || refused.contains(&key.as_str()) {
                return Err(config_error(self.config, name, &format!("{key}: set by the loop for each round")));
            }
            let long = key.replace('_', "-");
            let Some(arg) = cmd.get_arguments().find(|a| a.get_long() == Some(long.as_str())) else {
                return Err(config_error(self.config, name, &format!("{key}: `bpo {command}` has no --{long}")));
            };
            let values = match value {
                toml::Value::Array(items) => items.clone(),
                v => vec![v.clone()],
            };
            for v in values {
                let text = match v {
                    toml::Value::Boolean(b) if matches!(arg.get_action(), ArgAction::SetTrue) => {
                        if b {
                            argv.push(format!("--{long}"));
                        }
                        continue;
                    }
                    toml::Value::String(s) if arg.get_value_parser().type_id() == std::any::TypeId::of::<PathBuf>() => {
                        self.base.join(s).display().to_string()
                    }
                    toml::Value::String(s) => s,
                    toml::Value::Integer(i) => i.to_string(),
                    toml::Value::Float(f) => f.to_string(),
                    toml::Value::Boolean(b) => b.to_string(),
                    _ => {
                        return Err(config_error(
                            self.config,
                            name,
                            &format!("{key}: a number, a string or a list of them"),
                        ))
                    }
                };
                argv.push(format!("--{long}={text}"));
            }
        }
        argv.extend(set.iter().map(|(k, v)| format!("--{}={v}", k.replace('_', "-"))));
        let matches = cmd.try_get_matches_from(argv).map_err(|e| {
            let text = e.render().to_string();
            let line = text.lines().next().unwrap_or_default().trim_start_matches("error: ").to_string();
            config_error(self.config, name, &line)
        })?;
        Ok(T::from_arg_matches(&matches)?)
    }
}

/// A setting of the config that cannot be used: one line naming the file and the section, status 2 (as clap's).
fn config_error(config: &Path, section: &str, msg: &str) -> anyhow::Error {
    let at = if section.is_empty() { String::new() } else { format!(" [{section}]") };
    bpo::Error::Range(format!("{}:{at} {}", config.display(), msg.trim().replace('\n', " "))).into()
}
