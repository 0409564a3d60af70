//! The `options!` macro, so that each option is declared in one place: its doc comment (the help
//! text), its clap attributes (flag and environment variable), its serde attributes (TOML key),
//! its type and its default. From that one declaration it generates
//!
//! - the field of [`Options`](super::Options), with the help text ending in `[default: …]`,
//!   written from the same default the node uses;
//! - its line in `Options::or`, the merge of the command line over the file;
//! - its field in `Given`, the options with their defaults filled in, which `validate` reads.
//!
//! The first field is the config file itself: not a key of the file, nor merged, nor validated.
//! Every other option is declared as
//!
//! ```text
//! /// Help text.
//! #[arg(long, env = "SWITCHBOARD_NAME", value_name = "N")]
//! pub name: u64 = 100;                        // a value: `[default: 100]`; `Given::name` is a u64
//! pub other: usize, default "computed from …"; // described: `[default: computed from …]`; an Option
//! pub third: String;                           // no default: nothing shown; an Option
//! ```
//!
//! clap never fills a default itself, so an option left unset on the command line can still be
//! set by the file (flag and variable > file > default).

/// The help text of an option: its doc comment's lines joined as clap joins them (trimmed, one
/// space between, the final period dropped), then the default, if there is one.
pub(super) fn help(doc: &[&str], default: Option<String>) -> String {
    let mut text = doc
        .iter()
        .map(|line| line.trim())
        .collect::<Vec<_>>()
        .join(" ");
    if text.ends_with('.') && !text.ends_with("..") {
        text.pop();
    }
    if let Some(default) = default {
        text.push_str(&format!(" [default: {default}]"));
    }
    text
}

/// The `[default: …]` text of an option's declaration: its value as displayed, its description,
/// or none.
macro_rules! default_help {
    () => {
        None
    };
    (, $text:literal) => {
        Some(String::from($text))
    };
    ($default:expr) => {
        Some($default.to_string())
    };
}

/// The type an option has in `Given`: its own type when its default is a value, else an `Option`
/// (the default is computed in `validate`, or there is none).
macro_rules! given_type {
    ($ty:ty) => { Option<$ty> };
    ($ty:ty, $default:expr) => { $ty };
}

/// An option's value in `Given`.
macro_rules! given_value {
    ($value:expr) => {
        $value
    };
    ($value:expr, $default:expr) => {
        $value.unwrap_or_else(|| $default)
    };
}

macro_rules! options {
    (
        $(#[$meta:meta])*
        pub struct Options {
            $(#[doc = $file_doc:literal])*
            #[arg($($file_arg:tt)*)]
            #[serde(skip)]
            pub $file:ident: $file_ty:ty;

            $(
                $(#[doc = $doc:literal])*
                #[arg($($arg:tt)*)]
                $(#[serde($($serde:tt)*)])?
                pub $field:ident: $ty:ty $(= $default:expr)? $(, default $text:literal)?;
            )*
        }
    ) => {
        $(#[$meta])*
        pub struct Options {
            $(#[doc = $file_doc])*
            #[arg($($file_arg)*, help = $crate::config::declare::help(&[$($file_doc),*], None))]
            #[serde(skip)]
            pub $file: Option<$file_ty>,

            $(
                $(#[doc = $doc])*
                #[arg(
                    $($arg)*,
                    help = $crate::config::declare::help(
                        &[$($doc),*],
                        $crate::config::declare::default_help!($($default)? $(, $text)?),
                    )
                )]
                $(#[serde($($serde)*)])?
                pub $field: Option<$ty>,
            )*
        }

        /// Every option but the file, with its default where the default is a value.
        struct Given {
            $($field: $crate::config::declare::given_type!($ty $(, $default)?),)*
        }

        impl Options {
            /// Fills every option the command line and environment left unset from `file`.
            pub fn or(self, file: Options) -> Options {
                Options {
                    $file: self.$file,
                    $($field: self.$field.or(file.$field),)*
                }
            }

            /// The options whose default is a value, by field name, with that value as the help
            /// text shows it (for the test that holds docs/configuration.md to them).
            #[cfg(test)]
            fn value_defaults() -> Vec<(&'static str, String)> {
                vec![$($((stringify!($field), $default.to_string()),)?)*]
            }

            /// These options, with the defaults that are values filled in.
            fn given(self) -> Given {
                Given {
                    $($field: $crate::config::declare::given_value!(self.$field $(, $default)?),)*
                }
            }
        }
    };
}

pub(super) use {default_help, given_type, given_value, options};
