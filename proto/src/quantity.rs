//! Human quantities on the command line and in manifests: memory (`512M`, `2G`, `1Gi`) and
//! CPU (`0.5`, `2`, `500m`).

/// Parses a memory size. Units are binary, as in `docker run -m`: `k`, `m`, `g`, `t`
/// (also written `K`, `Mi`, `MB`, ...); a bare number is bytes.
pub fn parse_memory(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(split);
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "ki" | "kib" => 10,
        "m" | "mb" | "mi" | "mib" => 20,
        "g" | "gb" | "gi" | "gib" => 30,
        "t" | "tb" | "ti" | "tib" => 40,
        _ => {
            return Err(format!(
                "{text:?} has an unknown unit (use b, k, m, g or t, e.g. 512M)"
            ))
        }
    };
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size like 512M or 2G"))?;
    let bytes = value * (1u64 << shift) as f64;
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
        return Err(format!("{text:?} is out of range"));
    }
    Ok(bytes as u64)
}

/// Parses a CPU amount into thousandths of a core: `0.5` and `500m` are both 500.
pub fn parse_cpu(text: &str) -> Result<u32, String> {
    let trimmed = text.trim();
    let millis = match trimmed.strip_suffix('m') {
        Some(millis) => millis
            .parse::<u32>()
            .map_err(|_| format!("{text:?} is not a CPU amount like 500m"))?
            as f64,
        None => {
            trimmed
                .parse::<f64>()
                .map_err(|_| format!("{text:?} is not a CPU amount like 0.5, 2 or 500m"))?
                * 1000.0
        }
    };
    if !millis.is_finite() || millis < 0.0 || millis > u32::MAX as f64 {
        return Err(format!("{text:?} is out of range"));
    }
    Ok(millis.round() as u32)
}

/// Parses a duration such as `10s`, `1m30s` or `500ms`.
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(text.trim())
        .map_err(|e| format!("{text:?} is not a duration like 10s, 1m30s or 500ms ({e})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_units_are_binary() {
        assert_eq!(parse_memory("512M"), Ok(512 << 20));
        assert_eq!(parse_memory("2G"), Ok(2 << 30));
        assert_eq!(parse_memory("1Gi"), Ok(1 << 30));
        assert_eq!(parse_memory("1.5g"), Ok(3 << 29));
        assert_eq!(parse_memory("4096"), Ok(4096));
        assert!(parse_memory("12X").is_err());
        assert!(parse_memory("M").is_err());
        assert!(parse_memory("-1M").is_err());
    }

    #[test]
    fn cpu_accepts_cores_and_millis() {
        assert_eq!(parse_cpu("0.5"), Ok(500));
        assert_eq!(parse_cpu("2"), Ok(2000));
        assert_eq!(parse_cpu("500m"), Ok(500));
        assert!(parse_cpu("half").is_err());
        assert!(parse_cpu("-1").is_err());
    }

    #[test]
    fn durations_name_the_expected_form() {
        assert_eq!(
            parse_duration("1m30s"),
            Ok(std::time::Duration::from_secs(90))
        );
        assert!(parse_duration("10").unwrap_err().contains("10s"));
    }
}
