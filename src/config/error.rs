//! Configuration errors that name the field a user has to fix.

use std::fmt;

/// One problem in a configuration, located by its field path
/// (`static_resources.clusters[2].lb_policy`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub path: String,
    pub reason: String,
    /// The extension type this error is about, when the problem is that legate does not
    /// implement it (for the summary a migrating user reads first).
    pub extension: Option<String>,
}

impl ConfigError {
    pub fn new(path: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError {
            path: path.into(),
            reason: reason.into(),
            extension: None,
        }
    }

    /// An extension (by its type's full name) that legate does not implement.
    pub fn extension(path: &str, reason: impl Into<String>, type_name: &str) -> Self {
        ConfigError {
            extension: Some(type_name.to_string()),
            ..ConfigError::new(path, reason)
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}", self.reason)
        } else {
            write!(f, "{}: {}", self.path, self.reason)
        }
    }
}

/// Every problem found in one configuration; validation keeps going after the first so
/// a user can fix them all in one pass.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl ConfigErrors {
    pub fn one(path: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigErrors(vec![ConfigError::new(path, reason)])
    }

    /// `N errors; extension types legate does not implement: a, b`: the line `--validate`
    /// ends with.
    pub fn summary(&self) -> String {
        let n = self.0.len();
        let mut line = format!("{n} error{}", if n == 1 { "" } else { "s" });
        let mut types: Vec<&str> = self
            .0
            .iter()
            .filter_map(|e| e.extension.as_deref())
            .collect();
        types.sort_unstable();
        types.dedup();
        if !types.is_empty() {
            line.push_str(&format!(
                "; {} extension type{} legate does not implement: {}",
                types.len(),
                if types.len() == 1 { "" } else { "s" },
                types.join(", ")
            ));
        }
        line
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Collects errors while a configuration is converted.
#[derive(Debug, Default)]
pub struct Errors {
    list: Vec<ConfigError>,
}

impl Errors {
    pub fn add(&mut self, path: impl Into<String>, reason: impl Into<String>) {
        self.list.push(ConfigError::new(path, reason));
    }

    /// An extension legate does not implement, by its type's full name (or, where the
    /// config gives no type, its extension name): counted in the summary.
    pub fn unsupported_extension(
        &mut self,
        at: impl Into<String>,
        type_name: &str,
        reason: impl Into<String>,
    ) {
        let at = at.into();
        self.list
            .push(ConfigError::extension(&at, reason, type_name));
    }

    /// Records `at.field: not supported` when a field the gateway does not implement is set.
    pub fn unsupported<T: IsSet + ?Sized>(&mut self, at: &str, field: &str, value: &T) {
        if value.is_set() {
            let field = field.trim_start_matches("r#");
            self.add(join(at, field), "not supported");
        }
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    pub fn into_result<T>(self, value: T) -> Result<T, ConfigErrors> {
        if self.list.is_empty() {
            Ok(value)
        } else {
            Err(ConfigErrors(self.list))
        }
    }

    pub fn extend(&mut self, other: ConfigErrors) {
        self.list.extend(other.0);
    }
}

/// `a.b` — a child path; the root path is the empty string.
pub fn join(at: &str, field: &str) -> String {
    if at.is_empty() {
        field.to_string()
    } else {
        format!("{at}.{field}")
    }
}

/// `a[3]` — an element of a repeated field.
pub fn index(at: &str, i: usize) -> String {
    format!("{at}[{i}]")
}

/// Whether a proto field holds something other than its default, i.e. the user set it.
pub trait IsSet {
    fn is_set(&self) -> bool;
}

impl<T: IsSet + ?Sized> IsSet for &T {
    fn is_set(&self) -> bool {
        (**self).is_set()
    }
}
impl<T> IsSet for Option<T> {
    fn is_set(&self) -> bool {
        self.is_some()
    }
}
impl<T> IsSet for Vec<T> {
    fn is_set(&self) -> bool {
        !self.is_empty()
    }
}
impl<K, V> IsSet for std::collections::HashMap<K, V> {
    fn is_set(&self) -> bool {
        !self.is_empty()
    }
}
impl IsSet for String {
    fn is_set(&self) -> bool {
        !self.is_empty()
    }
}
impl IsSet for bool {
    fn is_set(&self) -> bool {
        *self
    }
}
macro_rules! numeric_is_set {
    ($($t:ty),*) => { $(impl IsSet for $t { fn is_set(&self) -> bool { *self != 0 as $t } })* };
}
numeric_is_set!(i32, u32, i64, u64, f64, f32);

/// Rejects each named field that is set: `reject_set!(errs, at, field_a, field_b)`.
#[macro_export]
macro_rules! reject_set {
    ($errs:expr, $at:expr, $($field:ident),+ $(,)?) => {
        $( $errs.unsupported($at, stringify!($field), &$field); )+
    };
}
