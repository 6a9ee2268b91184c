//! Deterministic generation of WSO2-like deployment trees for tests, the demo and benchmarks.
//!
//! A tree has the layout of `<CARBON_HOME>/repository/deployment/server`: Synapse XML under
//! `synapse-configs/default/*`, CAR files under `carbonapps`, WAR files and an exploded webapp
//! under `webapps`, plus an empty directory and a symlink. CARs and WARs are real ZIP archives
//! (deflated XML and classes, stored JARs), as a build would produce them. The same seed gives
//! the same bytes.

pub mod bench;

use std::fs;
use std::io::{self, Write};
use std::path::Path;

/// A small, fast, seedable pseudo-random generator (xorshift64*), so trees are reproducible.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `lo..hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo).max(1)
    }

    /// Fills `buf` with random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// Writes `len` random bytes to `path`, streaming in 1 MiB blocks.
pub fn write_random(path: &Path, len: u64, rng: &mut Rng) -> io::Result<()> {
    let mut f = io::BufWriter::new(fs::File::create(path)?);
    let mut buf = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        rng.fill(&mut buf[..n]);
        f.write_all(&buf[..n])?;
        left -= n as u64;
    }
    f.into_inner().map_err(|e| e.into_error())?.sync_all()
}

/// A Synapse-like XML document of about `len` bytes.
pub fn synapse_xml(name: &str, len: usize, rng: &mut Rng) -> String {
    let mut s = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<api xmlns=\"http://ws.apache.org/ns/synapse\" name=\"{name}\" context=\"/{name}\">\n"
    );
    let mut i = 0;
    while s.len() < len {
        s.push_str(&format!(
            "  <resource methods=\"GET\" uri-template=\"/r{i}/{{id}}\">\n    <inSequence><log level=\"custom\"><property name=\"id\" value=\"{}\"/></log><send/></inSequence>\n  </resource>\n",
            rng.next_u64()
        ));
        i += 1;
    }
    s.push_str("</api>\n");
    s
}

/// Which kind of archive to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Archive {
    /// A Carbon application: artifact XML and bundled JARs.
    Car,
    /// A web application: `WEB-INF/web.xml`, classes and library JARs.
    War,
}

/// Writes a real ZIP archive of about `len` bytes to `path`. `build` stands for the build that
/// made it: entry timestamps come from it, as with a real, non-reproducible build.
pub fn write_archive(
    path: &Path,
    kind: Archive,
    len: u64,
    rng: &mut Rng,
    build: u32,
) -> io::Result<()> {
    write_archive_edited(path, kind, len, rng, build, None)
}

/// [`write_archive`], with `edit` written into the first class (WAR) or API (CAR) entry: given
/// the same generator state, the archive differs from the unedited one in that entry only (and,
/// with another `build`, in every entry's timestamp, as a rebuild would).
pub fn write_archive_edited(
    path: &Path,
    kind: Archive,
    len: u64,
    rng: &mut Rng,
    build: u32,
    edit: Option<&str>,
) -> io::Result<()> {
    use zip::write::SimpleFileOptions;
    use zip::{CompressionMethod, DateTime};
    let file = fs::File::create(path)?;
    let mut zip = zip::ZipWriter::new(io::BufWriter::new(file));
    let time = DateTime::from_date_and_time(
        2024,
        1 + (build % 12) as u8,
        1 + (build % 28) as u8,
        12,
        (build % 60) as u8,
        0,
    )
    .map_err(|e| io::Error::other(e.to_string()))?;
    let deflated = SimpleFileOptions::default()
        .compression_method(CompressionMethod::Deflated)
        .last_modified_time(time);
    let stored = SimpleFileOptions::default()
        .compression_method(CompressionMethod::Stored)
        .last_modified_time(time)
        .large_file(len > u32::MAX as u64 / 2);
    let err = |e: zip::result::ZipError| io::Error::other(e.to_string());
    zip.start_file("META-INF/MANIFEST.MF", deflated)
        .map_err(err)?;
    zip.write_all(b"Manifest-Version: 1.0\nCreated-By: syncd-devtools\n")?;
    let (descriptor, dir) = match kind {
        Archive::Car => ("artifacts.xml", "lib"),
        Archive::War => ("WEB-INF/web.xml", "WEB-INF/lib"),
    };
    zip.start_file(descriptor, deflated).map_err(err)?;
    zip.write_all(synapse_xml("descriptor", 4_000, rng).as_bytes())?;
    // A web application has many classes (one for every 50 KB of archive); a CAR a few APIs.
    let entries = match (kind, rng.range(3, 12)) {
        (Archive::War, n) => n + len / 50_000,
        (Archive::Car, n) => n,
    };
    for i in 0..entries {
        let name = match kind {
            Archive::Car => format!("api_{i}/api_{i}.xml"),
            Archive::War => format!("WEB-INF/classes/org/example/Service{i}.class"),
        };
        zip.start_file(name, deflated).map_err(err)?;
        let mut body = synapse_xml(&format!("entry{i}"), rng.range(1_000, 8_000) as usize, rng);
        if i == 0
            && let Some(edit) = edit
        {
            let at = body.len() / 2;
            body.insert_str(at, edit);
        }
        zip.write_all(body.as_bytes())?;
    }
    // Library JARs (already compressed, so stored) make up the size.
    let mut written = 20_000u64;
    let mut buf = vec![0u8; 1 << 20];
    let mut i = 0;
    while written < len {
        let jar = (len - written).min(rng.range(50_000, 8_000_000));
        zip.start_file(format!("{dir}/lib-{i:03}.jar"), stored)
            .map_err(err)?;
        let mut left = jar;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            rng.fill(&mut buf[..n]);
            zip.write_all(&buf[..n])?;
            left -= n as u64;
        }
        written += jar + 80;
        i += 1;
    }
    let out = zip.finish().map_err(err)?;
    out.into_inner().map_err(|e| e.into_error())?.sync_all()
}

/// How big a generated tree is.
#[derive(Debug, Clone, Copy)]
pub struct Scale {
    /// Synapse XML files (1-20 KB each).
    pub xml_files: usize,
    /// CAR files and their size range in bytes.
    pub car_files: usize,
    /// Smallest and largest CAR.
    pub car_size: (u64, u64),
    /// WAR files.
    pub war_files: usize,
    /// Smallest and largest WAR.
    pub war_size: (u64, u64),
    /// Files in the exploded webapp.
    pub exploded_files: usize,
}

impl Scale {
    /// A few MB: quick tests and the demo.
    pub const SMALL: Scale = Scale {
        xml_files: 40,
        car_files: 4,
        car_size: (100_000, 2_000_000),
        war_files: 1,
        war_size: (3_000_000, 5_000_000),
        exploded_files: 30,
    };

    /// About 200 MB in about 2,000 files: the first scale of the benchmark against rsync.
    pub const MEDIUM: Scale = Scale {
        xml_files: 1_700,
        car_files: 50,
        car_size: (100_000, 3_000_000),
        war_files: 1,
        war_size: (5_000_000, 30_000_000),
        exploded_files: 200,
    };

    /// About 1.5 GB in about 10,000 files: the second scale.
    pub const LARGE: Scale = Scale {
        xml_files: 8_300,
        car_files: 140,
        car_size: (100_000, 10_000_000),
        war_files: 8,
        war_size: (5_000_000, 150_000_000),
        exploded_files: 1_400,
    };
}

/// Generates a tree under `root` (created if absent).
pub fn generate(root: &Path, scale: Scale, seed: u64) -> io::Result<()> {
    let mut rng = Rng::new(seed);
    let api = root.join("synapse-configs/default/api");
    let seq = root.join("synapse-configs/default/sequences");
    let cars = root.join("carbonapps");
    let webapps = root.join("webapps");
    let exploded = webapps.join("console/WEB-INF/lib");
    for d in [&api, &seq, &cars, &exploded, &root.join("jaggeryapps")] {
        fs::create_dir_all(d)?;
    }
    for i in 0..scale.xml_files {
        let dir = if i % 4 == 0 { &seq } else { &api };
        let len = rng.range(1_000, 20_000) as usize;
        fs::write(
            dir.join(format!("service-{i:04}.xml")),
            synapse_xml(&format!("service{i}"), len, &mut rng),
        )?;
    }
    for i in 0..scale.car_files {
        let len = rng.range(scale.car_size.0, scale.car_size.1);
        write_archive(
            &cars.join(format!("app-{i:03}_1.0.0.car")),
            Archive::Car,
            len,
            &mut rng,
            1,
        )?;
    }
    for i in 0..scale.war_files {
        let len = rng.range(scale.war_size.0, scale.war_size.1);
        write_archive(
            &webapps.join(format!("service-{i:03}.war")),
            Archive::War,
            len,
            &mut rng,
            1,
        )?;
    }
    for i in 0..scale.exploded_files {
        let len = rng.range(500, 50_000);
        write_archive(
            &exploded.join(format!("lib-{i:03}.jar")),
            Archive::Car,
            len,
            &mut rng,
            1,
        )?;
    }
    fs::write(
        webapps.join("console/index.html"),
        b"<html>console</html>\n",
    )?;
    let link = root.join("carbonapps/latest.car");
    if fs::symlink_metadata(&link).is_err() && scale.car_files > 0 {
        std::os::unix::fs::symlink("app-000_1.0.0.car", link)?;
    }
    Ok(())
}
