//! SMS encoding and segment count: GSM-7 (3GPP TS 23.038 default alphabet plus its
//! extension table) when every character fits, UCS-2 otherwise.

/// The GSM 03.38 default alphabet (127 characters; 0x1B is the escape to the extension table).
const GSM7_BASIC: &str = "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?\
¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà";
/// The extension table: each costs an escape septet plus its own.
const GSM7_EXTENSION: &str = "\u{0C}^{}\\[~]|€";

/// How an SMS is encoded on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmsEncoding {
    Gsm7,
    Ucs2,
}

impl SmsEncoding {
    /// The name used in `RenderedContent.sms_encoding`.
    pub fn as_str(self) -> &'static str {
        match self {
            SmsEncoding::Gsm7 => "GSM-7",
            SmsEncoding::Ucs2 => "UCS-2",
        }
    }
}

/// Encoding, size in code units (septets or UTF-16 units) and segment count of one text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SmsSize {
    pub encoding: SmsEncoding,
    pub units: usize,
    pub segments: usize,
}

/// Measures `text`: GSM-7 fits 160 septets in one segment and 153 per segment of a
/// concatenated message; UCS-2 fits 70 and 67 UTF-16 units.
pub fn measure(text: &str) -> SmsSize {
    let septets: Option<usize> = text.chars().map(gsm7_septets).sum();
    let (encoding, units, single, multi) = match septets {
        Some(n) => (SmsEncoding::Gsm7, n, 160, 153),
        None => (SmsEncoding::Ucs2, text.encode_utf16().count(), 70, 67),
    };
    let segments = if units <= single { 1 } else { units.div_ceil(multi) };
    SmsSize { encoding, units, segments }
}

fn gsm7_septets(c: char) -> Option<usize> {
    if GSM7_BASIC.contains(c) {
        Some(1)
    } else if GSM7_EXTENSION.contains(c) {
        Some(2)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn size(text: &str) -> (SmsEncoding, usize, usize) {
        let s = measure(text);
        (s.encoding, s.units, s.segments)
    }

    #[test]
    fn the_basic_alphabet_has_127_one_septet_characters() {
        assert_eq!(GSM7_BASIC.chars().count(), 127);
        assert_eq!(size(GSM7_BASIC), (SmsEncoding::Gsm7, 127, 1));
    }

    #[test]
    fn gsm7_fits_160_septets_in_one_segment_then_153_per_segment() {
        assert_eq!(size(&"a".repeat(160)), (SmsEncoding::Gsm7, 160, 1));
        assert_eq!(size(&"a".repeat(161)), (SmsEncoding::Gsm7, 161, 2));
        assert_eq!(size(&"a".repeat(306)), (SmsEncoding::Gsm7, 306, 2));
        assert_eq!(size(&"a".repeat(307)), (SmsEncoding::Gsm7, 307, 3));
        assert_eq!(size(""), (SmsEncoding::Gsm7, 0, 1));
    }

    #[test]
    fn extension_characters_count_two_septets() {
        for c in GSM7_EXTENSION.chars() {
            assert_eq!(size(&c.to_string()), (SmsEncoding::Gsm7, 2, 1), "{c:?}");
        }
        // 80 euro signs are 160 septets; one more character tips it over.
        assert_eq!(size(&"€".repeat(80)), (SmsEncoding::Gsm7, 160, 1));
        assert_eq!(size(&format!("{}a", "€".repeat(80))), (SmsEncoding::Gsm7, 161, 2));
        assert_eq!(size("Price: 5€ [sale] {now}"), (SmsEncoding::Gsm7, 27, 1));
    }

    #[test]
    fn any_other_character_switches_to_ucs2_with_70_and_67() {
        assert_eq!(size(&"Ж".repeat(70)), (SmsEncoding::Ucs2, 70, 1));
        assert_eq!(size(&"Ж".repeat(71)), (SmsEncoding::Ucs2, 71, 2));
        assert_eq!(size(&"Ж".repeat(135)), (SmsEncoding::Ucs2, 135, 3));
        // One emoji is two UTF-16 units and turns the whole text into UCS-2.
        assert_eq!(size(&format!("{}🎉", "a".repeat(68))), (SmsEncoding::Ucs2, 70, 1));
        assert_eq!(size(&format!("{}🎉", "a".repeat(69))), (SmsEncoding::Ucs2, 71, 2));
        assert_eq!(SmsEncoding::Ucs2.as_str(), "UCS-2");
        assert_eq!(SmsEncoding::Gsm7.as_str(), "GSM-7");
    }
}
