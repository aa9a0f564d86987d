//! GPT-2's byte-to-character table, which byte-level BPE vocabularies are written in.

pub fn byte_to_char() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut extra = 0u32;
    for b in 0..256u32 {
        let printable = (b'!' as u32..=b'~' as u32).contains(&b)
            || (0xA1..=0xAC).contains(&b)
            || (0xAE..=0xFF).contains(&b);
        table[b as usize] = if printable {
            char::from_u32(b).unwrap_or('?')
        } else {
            extra += 1;
            char::from_u32(255 + extra).unwrap_or('?')
        };
    }
    table
}

pub fn encode(bytes: &[u8], table: &[char; 256]) -> String {
    bytes.iter().map(|&b| table[b as usize]).collect()
}

/// The inverse of [`encode`]; `None` if a character is not in the table.
pub fn decode(s: &str, table: &[char; 256]) -> Option<Vec<u8>> {
    s.chars()
        .map(|c| table.iter().position(|&t| t == c).map(|p| p as u8))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_gpt2_table() {
        let t = byte_to_char();
        assert_eq!(t[b'a' as usize], 'a');
        assert_eq!(t[b' ' as usize], 'Ġ');
        assert_eq!(t[b'\n' as usize], 'Ċ');
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(decode(&encode(&all, &t), &t).unwrap(), all);
    }
}
