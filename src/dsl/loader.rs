//! Reading a pipeline file and, transitively, the files it imports.
//!
//! Imports are relative to the importing file, so a shared file never needs editing to run
//! elsewhere. A file imported twice (a diamond) is loaded once; a file that imports itself,
//! directly or not, is an error naming the whole chain.

use std::path::{Path, PathBuf};

use crate::dsl::ast;
use crate::dsl::diagnostic::{Code, Diagnostic};
use crate::dsl::parser::KEYWORDS;
use crate::dsl::parser::parse_file;
use crate::dsl::span::{FileId, SourceMap, Span};
use crate::read_limits::{ReadKind, read_bounded};
use crate::read_policy::ReadPolicy;

/// One parsed file of a pipeline.
#[derive(Clone, Debug)]
pub(crate) struct LoadedFile {
    pub id: FileId,
    pub ast: ast::File,
    /// The folder that relative paths in this file (imports, data, templates) start from.
    pub dir: PathBuf,
}

/// A pipeline and its imports, parsed, with every diagnostic met on the way.
#[derive(Debug, Default)]
pub(crate) struct Loaded {
    pub sources: SourceMap,
    /// Root first, then imports in the order they were met.
    pub files: Vec<LoadedFile>,
    pub diagnostics: Vec<Diagnostic>,
}

/// Reads and parses `path` and everything it imports; an import `reads` refuses is an error.
pub(crate) fn load(path: &Path, reads: &ReadPolicy) -> Loaded {
    let mut loaded = Loaded::default();
    match read_bounded(path, ReadKind::PipelineSource) {
        Ok(bytes) => match pipeline_text(bytes) {
            Ok(text) => {
                let mut loader = Loader {
                    loaded: &mut loaded,
                    seen: Vec::new(),
                    reads,
                };
                loader.load_file(path, text, Vec::new());
            }
            Err(not) => loaded.diagnostics.push(
                Diagnostic::error(
                    Code::NotAPipeline,
                    format!(
                        "`{}` is not a pipeline file: {}",
                        path.display(),
                        not.reason
                    ),
                )
                .with_hint(not.hint),
            ),
        },
        Err(e) => loaded.diagnostics.push(
            Diagnostic::error(
                Code::Io,
                format!("cannot read pipeline `{}`: {}", path.display(), e),
            )
            .with_hint("check the path; it is relative to the current directory"),
        ),
    }
    loaded
}

/// Why bytes are refused before parsing, in words for a diagnostic.
struct NotAPipeline {
    reason: String,
    hint: String,
}

/// The text of a pipeline file, or why these bytes plainly are not one (issue 14 item 8): a
/// binary file or a table given by mistake is refused at once, with what it looks like, instead
/// of a syntax error at 1:1.
fn pipeline_text(bytes: Vec<u8>) -> Result<String, NotAPipeline> {
    const HINT: &str = "pass the pipeline file (`.vp` text); data files are named inside it, \
                        e.g. `source = csv(\"pets.csv\")`";
    if let Some(at) = bytes.iter().position(|&b| b == 0) {
        return Err(NotAPipeline {
            reason: format!("it is binary (a NUL byte at offset {at})"),
            hint: HINT.to_owned(),
        });
    }
    let text = String::from_utf8(bytes).map_err(|e| NotAPipeline {
        reason: format!(
            "it is not utf-8 text (an invalid byte at offset {})",
            e.utf8_error().valid_up_to()
        ),
        hint: HINT.to_owned(),
    })?;
    if let Some(line) = table_header(&text) {
        let shown: String = line.chars().take(60).collect();
        let more = if shown.len() < line.len() { "…" } else { "" };
        return Err(NotAPipeline {
            reason: format!("its first line looks like a table header (`{shown}{more}`)"),
            hint: HINT.to_owned(),
        });
    }
    Ok(text)
}

/// The first line of `text` when it reads like a CSV or TSV header rather than a declaration:
/// fields separated by `,`, `;` or tabs, with no `=` or `{` a declaration would have.
fn table_header(text: &str) -> Option<&str> {
    let first = text
        .lines()
        .map(|l| l.trim_start_matches('\u{FEFF}').trim())
        .find(|l| !l.is_empty() && !l.starts_with("//"))?;
    let separated = [',', ';', '\t']
        .iter()
        .any(|sep| first.split(*sep).count() >= 2);
    let declaration_like = first.contains(['=', '{', '"'])
        || first
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .next()
            .is_some_and(|w| KEYWORDS.contains(&w));
    (separated && !declaration_like).then_some(first)
}

/// Parses `text` as if it were the file at `path` (imports resolve from `path`'s folder).
pub(crate) fn load_text(path: &Path, text: &str, reads: &ReadPolicy) -> Loaded {
    let mut loaded = Loaded::default();
    let mut loader = Loader {
        loaded: &mut loaded,
        seen: Vec::new(),
        reads,
    };
    loader.load_file(path, text.to_owned(), Vec::new());
    loaded
}

struct Loader<'a> {
    loaded: &'a mut Loaded,
    /// Canonical paths of loaded files, by file id order.
    seen: Vec<(PathBuf, FileId)>,
    reads: &'a ReadPolicy,
}

impl Loader<'_> {
    /// `stack` holds the imports that led here (canonical path, the import's span).
    fn load_file(&mut self, path: &Path, text: String, stack: Vec<(PathBuf, Option<Span>)>) {
        let id = self.loaded.sources.add(path, text);
        let canonical = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        self.seen.push((canonical.clone(), id));
        let text = self
            .loaded
            .sources
            .get(id)
            .map(|f| f.text.clone())
            .unwrap_or_default();
        let (file, diagnostics) = parse_file(id, &text);
        self.loaded.diagnostics.extend(diagnostics);
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let imports: Vec<ast::Import> = file
            .items
            .iter()
            .filter_map(|i| match i {
                ast::Item::Import(imp) => Some(imp.clone()),
                ast::Item::Decl(_) => None,
            })
            .collect();
        self.loaded.files.push(LoadedFile {
            id,
            ast: file,
            dir: dir.clone(),
        });
        let mut stack = stack;
        stack.push((canonical, None));
        for import in imports {
            self.load_import(&dir, &import, &stack);
        }
    }

    fn load_import(&mut self, dir: &Path, import: &ast::Import, stack: &[(PathBuf, Option<Span>)]) {
        let target = dir.join(&import.path.value);
        let span = import.path.span;
        // Before anything else, so a file outside is not even probed for existence.
        if let Err(refused) = self.reads.check(&target) {
            self.loaded.diagnostics.push(
                Diagnostic::error(
                    Code::Io,
                    format!(
                        "cannot import `{}`: it {}",
                        import.path.value,
                        refused.reason()
                    ),
                )
                .at_with(span, "outside the pipeline's folder")
                .with_hint(refused.hint()),
            );
            return;
        }
        let Ok(canonical) = std::fs::canonicalize(&target) else {
            self.loaded.diagnostics.push(
                Diagnostic::error(
                    Code::ImportNotFound,
                    format!("imported file `{}` not found", import.path.value),
                )
                .at_with(span, "no such file")
                .with_hint(format!(
                    "imports are relative to the importing file; looked for `{}`",
                    target.display()
                )),
            );
            return;
        };
        if let Some(pos) = stack.iter().position(|(p, _)| *p == canonical) {
            let chain: Vec<String> = stack[pos..]
                .iter()
                .map(|(p, _)| format!("`{}`", file_name(p)))
                .chain(std::iter::once(format!("`{}`", file_name(&canonical))))
                .collect();
            self.loaded.diagnostics.push(
                Diagnostic::error(
                    Code::ImportCycle,
                    format!("import cycle: {}", chain.join(" → ")),
                )
                .at_with(span, "imports a file that imports this one")
                .with_hint("move the shared declarations into a third file that both import"),
            );
            return;
        }
        if self.seen.iter().any(|(p, _)| *p == canonical) {
            return;
        }
        match read_bounded(&target, ReadKind::PipelineSource) {
            Ok(bytes) => match pipeline_text(bytes) {
                Ok(text) => {
                    let mut next = stack.to_vec();
                    if let Some(last) = next.last_mut() {
                        last.1 = Some(span);
                    }
                    self.load_file(&target, text, next);
                }
                Err(not) => self.loaded.diagnostics.push(
                    Diagnostic::error(
                        Code::NotAPipeline,
                        format!(
                            "imported file `{}` is not a pipeline file: {}",
                            import.path.value, not.reason
                        ),
                    )
                    .at(span)
                    .with_hint(not.hint),
                ),
            },
            Err(e) => self.loaded.diagnostics.push(
                Diagnostic::error(
                    Code::Io,
                    format!("cannot read imported file `{}`: {}", import.path.value, e),
                )
                .at(span),
            ),
        }
    }
}

fn file_name(path: &Path) -> String {
    path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}
