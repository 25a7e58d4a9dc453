//! Finding the image files a command should process.

use std::path::{Path, PathBuf};

use crate::error::VisionError;

/// Extensions (lower case) treated as images when listing a directory.
pub const IMAGE_EXTENSIONS: [&str; 4] = ["jpg", "jpeg", "png", "webp"];

/// Whether `path` has an image extension (case-insensitive).
pub fn has_image_extension(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| e.eq_ignore_ascii_case(x)))
}

/// The images to process for `path`: a file is returned as given (whatever its
/// extension: the user named it, and decoding reports a non-image clearly); a
/// directory yields its files with an image extension, not descending into
/// subdirectories, sorted by path. Hidden files (`.name`) are skipped.
pub fn list_images(path: &Path) -> Result<Vec<PathBuf>, VisionError> {
    collect(path, false)
}

/// Like [`list_images`], descending into subdirectories (not following symlinked
/// directories, which could loop).
pub fn list_images_recursive(path: &Path) -> Result<Vec<PathBuf>, VisionError> {
    collect(path, true)
}

fn io_err(path: &Path, source: std::io::Error) -> VisionError {
    VisionError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn collect(path: &Path, recursive: bool) -> Result<Vec<PathBuf>, VisionError> {
    let meta = std::fs::metadata(path).map_err(|e| io_err(path, e))?;
    if !meta.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut out = Vec::new();
    walk_dir(path, recursive, &mut out)?;
    out.sort();
    Ok(out)
}

fn walk_dir(dir: &Path, recursive: bool, out: &mut Vec<PathBuf>) -> Result<(), VisionError> {
    for entry in std::fs::read_dir(dir).map_err(|e| io_err(dir, e))? {
        let entry = entry.map_err(|e| io_err(dir, e))?;
        let p = entry.path();
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let file_type = entry.file_type().map_err(|e| io_err(&p, e))?;
        if file_type.is_dir() {
            if recursive {
                walk_dir(&p, recursive, out)?;
            }
        } else if has_image_extension(&p) && p.is_file() {
            out.push(p);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_images_sorted_case_insensitive() {
        let dir = std::env::temp_dir().join(format!("aperture-walk-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        for name in [
            "b.JPG",
            "a.png",
            "c.webp",
            "d.Jpeg",
            "notes.txt",
            ".hidden.png",
            "sub/e.png",
        ] {
            std::fs::write(dir.join(name), b"x").unwrap();
        }
        let names = |v: Vec<PathBuf>| -> Vec<String> {
            v.iter()
                .map(|p| p.strip_prefix(&dir).unwrap().to_string_lossy().into_owned())
                .collect()
        };
        assert_eq!(
            names(list_images(&dir).unwrap()),
            ["a.png", "b.JPG", "c.webp", "d.Jpeg"]
        );
        assert_eq!(
            names(list_images_recursive(&dir).unwrap()),
            ["a.png", "b.JPG", "c.webp", "d.Jpeg", "sub/e.png"]
        );
        // A file is returned as given, even without an image extension.
        assert_eq!(
            list_images(&dir.join("notes.txt")).unwrap(),
            [dir.join("notes.txt")]
        );
        let missing = list_images(&dir.join("missing")).unwrap_err().to_string();
        assert!(missing.contains("missing"), "{missing}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
