//! docs/configuration.md against the options themselves: every flag has its row, with its
//! variable, file key and default as `--help` shows them, and the document names no flag, file
//! key or variable that does not exist.

use super::*;

use clap::CommandFactory;

const DOC: &str = include_str!("../../../../docs/configuration.md");

/// A flag's row of an options table: the cells between the outer `|`s, trimmed.
struct Row {
    flag: String,
    env: String,
    key: String,
    default: String,
}

/// Every row of the option tables, by long flag name (without `--`).
fn rows() -> Vec<(String, Row)> {
    DOC.lines()
        .filter(|line| line.starts_with("| `--"))
        .map(|line| {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            assert_eq!(cells.len(), 7, "a table row without 5 cells: {line}");
            let flag = cells[1].to_owned();
            let name = flag
                .trim_start_matches("`--")
                .split([' ', '`'])
                .next()
                .unwrap_or_default()
                .to_owned();
            let row = Row {
                flag,
                env: cells[2].to_owned(),
                key: cells[3].to_owned(),
                default: cells[4].to_owned(),
            };
            (name, row)
        })
        .collect()
}

/// The options as clap knows them (not `--help` and `--version`).
fn arguments() -> Vec<clap::Arg> {
    Options::command()
        .get_arguments()
        .filter(|arg| !matches!(arg.get_id().as_str(), "help" | "version"))
        .cloned()
        .collect()
}

fn long(arg: &clap::Arg) -> &str {
    arg.get_long()
        .unwrap_or_else(|| panic!("option {} has no long flag", arg.get_id()))
}

/// The `[default: …]` at the end of an option's help text, if any.
fn help_default(arg: &clap::Arg) -> Option<String> {
    let help = arg.get_help()?.to_string();
    let (_, tail) = help.rsplit_once(" [default: ")?;
    Some(tail.strip_suffix(']')?.to_owned())
}

#[test]
fn every_option_has_a_row_with_its_variable_and_file_key() {
    let rows = rows();
    for arg in arguments() {
        let name = long(&arg);
        let matching: Vec<&Row> = rows
            .iter()
            .filter(|(row_name, _)| row_name == name)
            .map(|(_, row)| row)
            .collect();
        assert_eq!(
            matching.len(),
            1,
            "docs/configuration.md must have exactly one row for --{name}"
        );
        let row = matching[0];
        let env = arg
            .get_env()
            .and_then(|env| env.to_str())
            .unwrap_or_else(|| panic!("--{name} has no environment variable"));
        assert_eq!(row.env, format!("`{env}`"), "variable of --{name}");
        let key = if name == "config" {
            "—".to_owned()
        } else {
            format!("`{name}`")
        };
        assert_eq!(row.key, key, "file key of --{name}");
        assert!(
            !row.default.is_empty(),
            "the row of --{name} has no default"
        );
    }
}

#[test]
fn the_document_lists_no_option_that_does_not_exist() {
    let flags: Vec<String> = arguments().iter().map(|arg| long(arg).to_owned()).collect();
    for (name, row) in rows() {
        assert!(
            flags.contains(&name),
            "docs/configuration.md has a row for --{name} ({}), which is no option",
            row.flag
        );
    }
    // Flags named anywhere in the text, e.g. "`--jwt-secret` or `--jwt-public-key`".
    for (index, _) in DOC.match_indices("`--") {
        let name: String = DOC[index + 3..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
            .collect();
        assert!(
            flags.contains(&name) || name == "help" || name == "version",
            "docs/configuration.md names --{name}, which is no option"
        );
    }
    let envs: Vec<String> = arguments()
        .iter()
        .filter_map(|arg| arg.get_env()?.to_str().map(str::to_owned))
        .collect();
    for (index, _) in DOC.match_indices("SWITCHBOARD_") {
        let env: String = DOC[index..]
            .chars()
            .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        assert!(
            envs.contains(&env),
            "docs/configuration.md names {env}, which is no option's variable"
        );
    }
}

#[test]
fn defaults_in_the_document_are_the_defaults_of_the_help_text() {
    let rows = rows();
    let values = Options::value_defaults();
    for arg in arguments() {
        let name = long(&arg);
        let Some((_, row)) = rows.iter().find(|(row_name, _)| row_name == name) else {
            panic!("docs/configuration.md has no row for --{name}");
        };
        let value = values
            .iter()
            .find(|(field, _)| field.replace('_', "-") == name)
            .map(|(_, value)| value);
        match (value, help_default(&arg)) {
            // A value: the help shows it, and the document's cell starts with it.
            (Some(value), Some(shown)) => {
                assert_eq!(&shown, value, "--help's default of --{name}");
                assert!(
                    row.default.starts_with(&format!("`{value}`")),
                    "docs/configuration.md gives --{name} the default {}, --help {value}",
                    row.default
                );
            }
            (Some(value), None) => panic!("--help does not show --{name}'s default {value}"),
            // Computed or absent: the help describes it in words, the document in more.
            (None, _) => {}
        }
    }
}

#[test]
fn the_example_file_has_only_real_keys() {
    let start = DOC
        .find("```toml\n")
        .expect("docs/configuration.md has an example file");
    let text = &DOC[start + "```toml\n".len()..];
    let end = text.find("```").expect("the example file ends");
    if let Err(error) = toml::from_str::<Options>(&text[..end]) {
        panic!("the example file of docs/configuration.md does not parse: {error}");
    }
}
