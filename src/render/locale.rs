//! Which stored locale answers a request: for each wanted locale in order, the exact locale,
//! then its language (`de-DE` → `de`), then any variant of that language (`de` → `de-AT`);
//! then the same for [`DEFAULT_LOCALE`]; then the first available.

/// The locale used when none of the wanted ones is available.
pub const DEFAULT_LOCALE: &str = "en";

/// `de_DE`, `de-de` and ` DE-de ` are all `de-de`.
pub fn normalize(locale: &str) -> String {
    locale.trim().replace('_', "-").to_ascii_lowercase()
}

/// Index into `available` (normalized locales) of the best match for `wanted` (any form).
pub fn pick(available: &[&str], wanted: &[&str]) -> Option<usize> {
    let language = |l: &str| l.split('-').next().unwrap_or_default().to_owned();
    let find = |w: &str| {
        let w = normalize(w);
        let lang = language(&w);
        if w.is_empty() {
            return None;
        }
        available
            .iter()
            .position(|a| *a == w)
            .or_else(|| available.iter().position(|a| *a == lang))
            .or_else(|| available.iter().position(|a| language(a) == lang))
    };
    wanted.iter().find_map(|w| find(w)).or_else(|| find(DEFAULT_LOCALE)).or_else(|| (!available.is_empty()).then_some(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn picked<'a>(available: &[&'a str], wanted: &[&str]) -> Option<&'a str> {
        pick(available, wanted).map(|i| available[i])
    }

    #[test]
    fn prefers_exact_then_language_then_any_regional_variant() {
        let avail = ["de", "de-at", "de-de", "en", "fr-ca"];
        assert_eq!(picked(&avail, &["de_DE"]), Some("de-de"));
        assert_eq!(picked(&avail, &["de-CH"]), Some("de"));
        assert_eq!(picked(&["de-at", "en"], &["de-CH"]), Some("de-at"));
        assert_eq!(picked(&avail, &["fr"]), Some("fr-ca"));
    }

    #[test]
    fn tries_wanted_locales_in_order_before_the_default() {
        let avail = ["de", "en", "fr"];
        assert_eq!(picked(&avail, &["it", "fr-FR"]), Some("fr"));
        assert_eq!(picked(&avail, &["fr-CA", "de-DE"]), Some("fr"));
        assert_eq!(picked(&avail, &["", "it"]), Some("en"));
        assert_eq!(picked(&["de", "en-gb"], &["it"]), Some("en-gb"));
        assert_eq!(picked(&["fr", "de"], &["it"]), Some("fr"));
        assert_eq!(picked(&[], &["it"]), None);
    }

    #[test]
    fn normalizes_case_and_separators() {
        assert_eq!(normalize(" DE_de "), "de-de");
    }
}
