"""Phrase tables for the report writer: finding terms, noun phrases, sentence frames and cues.

Templates use :class:`string.Formatter` fields. ``{term}`` is the finding word
whose span becomes a mention. A field ending in ``_`` (``{size_}``) is an
optional modifier that brings its own trailing space, or is empty.
"""

from __future__ import annotations

__all__ = [
    "ABSENT_FRAMES",
    "BILATERAL_EFFUSION_TERMS",
    "ABSENT_LIST_FRAMES",
    "ABSENT_NOUN_PHRASES",
    "ABSENT_TERMS",
    "BOILERPLATE",
    "DRAWN_TERMS",
    "EMPHYSEMA_WORDS",
    "HEDGE_CUES",
    "IMPRESSION_HEDGES",
    "LOBE_WORDS",
    "NEGATION_CUES",
    "NORMAL_IMPRESSIONS",
    "NOUN_PHRASES",
    "PRESENT_FRAMES",
    "SECTION_HEADINGS",
    "SIDE_WORDS",
    "SPECIAL_ABSENT_SENTENCES",
    "SPECIAL_PRESENT_SENTENCES",
    "SPECIAL_TERM",
    "UNCERTAIN_FRAMES",
]

# Grammatical number of a term: "count" takes a/an, "mass" takes no article,
# "plural" takes no article and a plural verb.
DRAWN_TERMS = {
    "nodule": (("nodule", "count"), ("pulmonary nodule", "count"), ("solid nodule", "count"),
               ("nodular opacity", "count")),
    "mass": (("mass", "count"), ("pulmonary mass", "count"), ("soft tissue mass", "count"),
             ("lung mass", "count")),
    "consolidation": (("consolidation", "mass"), ("airspace consolidation", "mass"),
                      ("consolidative opacity", "count")),
    "ground_glass": (("ground-glass opacity", "count"), ("ground glass opacity", "count"),
                     ("GGO", "mass"), ("ground-glass opacities", "plural"), ("ground-glass attenuation", "mass")),
    "atelectasis": (("atelectasis", "mass"), ("subsegmental atelectasis", "mass"),
                    ("atelectatic change", "mass")),
    "pleural_effusion": (("pleural effusion", "count"), ("effusion", "count")),
    "pneumothorax": (("pneumothorax", "count"),),
    "emphysema": (("emphysema", "mass"), ("emphysematous change", "mass")),
    "cardiomegaly": (("cardiomegaly", "mass"), ("cardiac enlargement", "mass")),
    "pericardial_effusion": (("pericardial effusion", "count"), ("pericardial fluid collection", "count")),
}
# Bilateral pleural effusions are named in the plural.
BILATERAL_EFFUSION_TERMS = (("pleural effusions", "plural"), ("effusions", "plural"))

ABSENT_TERMS = {
    "nodule": (("pulmonary nodule", "count"), ("suspicious pulmonary nodule", "count"),
               ("pulmonary nodules", "plural"), ("nodule", "count")),
    "mass": (("mass", "count"), ("lung mass", "count"), ("pulmonary mass", "count")),
    "consolidation": (("focal consolidation", "mass"), ("consolidation", "mass"),
                      ("airspace consolidation", "mass")),
    "ground_glass": (("ground-glass opacity", "count"), ("ground-glass opacities", "plural"), ("GGO", "mass")),
    "atelectasis": (("atelectasis", "mass"),),
    "pleural_effusion": (("pleural effusion", "count"), ("pleural effusions", "plural")),
    "pneumothorax": (("pneumothorax", "count"),),
    "emphysema": (("emphysema", "mass"),),
    "cardiomegaly": (("cardiomegaly", "mass"),),
    "pericardial_effusion": (("pericardial effusion", "count"),),
}

# Lobe names as (noun, adjective, abbreviation). The lingula has no abbreviation.
LOBE_WORDS = {
    "RUL": ("right upper lobe", "right upper lobe", "RUL"),
    "RML": ("right middle lobe", "right middle lobe", "RML"),
    "RLL": ("right lower lobe", "right lower lobe", "RLL"),
    "LUL": ("left upper lobe", "left upper lobe", "LUL"),
    "LLL": ("left lower lobe", "left lower lobe", "LLL"),
    "lingula": ("lingula", "lingular", None),
}
SIDE_WORDS = {
    "right": ("right", "right-sided"),
    "left": ("left", "left-sided"),
    "bilateral": ("bilateral",),
}
EMPHYSEMA_WORDS = {
    "extent": {"mild": ("mild",), "moderate": ("moderate",), "severe": ("severe", "advanced")},
    "zone_adj": {"upper": "upper lobe predominant", "lower": "lower lobe predominant", "diffuse": "diffuse"},
    "zone_phrase": {
        "upper": ("predominantly in the upper lobes", "with upper lobe predominance"),
        "lower": ("predominantly in the lower lobes", "with lower lobe predominance"),
        "diffuse": ("throughout both lungs", "in a diffuse distribution"),
    },
}

# Noun phrases of drawn findings, without a leading article.
NOUN_PHRASES = {
    "nodule": (
        "{meas} {term} in the {loc}",
        "{term} in the {loc} measuring {meas}",
        "{loc_adj} {term} measuring {dims}",
        "{dims} {term} within the {loc}",
        "{meas} {loc_adj} {term}",
    ),
    "mass": (
        "{dims} {term} in the {loc}",
        "{loc_adj} {term} measuring {dims}",
        "{term} in the {loc} measuring up to {meas}",
        "{meas} {term} occupying the {loc}",
    ),
    "consolidation": (
        "{term} in the {loc}",
        "{loc_adj} {term}",
        "patchy {term} involving the {loc}",
        "{term} within the {loc}",
    ),
    "ground_glass": (
        "{term} in the {loc}",
        "patchy {term} in the {loc}",
        "{loc_adj} {term}",
        "hazy {term} involving the {loc}",
    ),
    "atelectasis": (
        "{term} in the {loc}",
        "{loc_adj} {term}",
        "wedge-shaped {term} in the {loc}",
        "peripheral {term} of the {loc}",
    ),
    "pleural_effusion": (
        "{size_}{side} {term}",
        "{size_}layering {side} {term}",
        "{size_}dependent {side} {term}",
        "{side} {term} of {size} size",
    ),
    "pneumothorax": (
        "{size_}{side} {term}",
        "{size_}{side} anterior {term}",
        "{size_}{side} apical {term}",
        "{side} {term} of {size} size",
    ),
    "emphysema": (
        "{extent} {zone_adj} {term}",
        "{extent} {term} {zone_phrase}",
        "{zone_adj} {term} of {extent} severity",
        "{extent} {zone_adj} {term} in both lungs",
    ),
    "cardiomegaly": (
        "{term}",
        "{term} with a widened cardiac contour",
        "{term} with a globular cardiac shape",
        "{term} involving all four chambers",
    ),
    "pericardial_effusion": (
        "{size_}{term}",
        "{size_}circumferential {term}",
        "{term} of {size} size",
        "{size_}{term} surrounding the heart",
    ),
}
# Noun phrases of negated findings, by the location fields the finding gives.
ABSENT_NOUN_PHRASES = {
    "lobe": ("{term} in the {loc}", "{term} within the {loc}", "{loc_adj} {term}"),
    "side": ("{side} {term}", "{term} on the {side_noun} side"),
    "none": ("{term}",),
}

# Sentence frames. {a} and {A} become "a ", "an ", "A ", "An " or nothing, and
# {is} becomes "are" for plural terms. {np} and {NP} are the noun phrase, the
# latter capitalised.
PRESENT_FRAMES = (
    "There {is} {a}{np}.",
    "{A}{NP} {is} present.",
    "{A}{NP} {is} noted.",
    "{A}{NP} {is} seen.",
    "{NP}.",
    "{A}{NP} {is} identified.",
)
UNCERTAIN_FRAMES = (
    "Possible {np}.",
    "Probable {np}.",
    "There {is} likely {a}{np}.",
    "Cannot exclude {a}{np}.",
    "Findings are suspicious for {a}{np}.",
    "Questionable {np}.",
    "{A}{NP} may be present.",
    "Findings likely represent {a}{np}.",
)
ABSENT_FRAMES = (
    "No {np}.",
    "There is no {np}.",
    "No evidence of {np}.",
    "Negative for {np}.",
    "{NP} {is} not seen.",
    "{NP} {is} absent.",
)
ABSENT_LIST_FRAMES = (
    "No {list}.",
    "There is no {list}.",
    "No evidence of {list}.",
    "Negative for {list}.",
)
# Whole sentences for one kind, used now and then instead of a frame. The
# {term} field is the mention and receives SPECIAL_TERM.
SPECIAL_PRESENT_SENTENCES = {
    "cardiomegaly": ("The heart is {term}.", "The heart is {term} in size."),
}
SPECIAL_ABSENT_SENTENCES = {
    "cardiomegaly": ("The heart is not {term}.",),
}
SPECIAL_TERM = {"cardiomegaly": "enlarged"}
IMPRESSION_HEDGES = ("Possible", "Probable", "Suspected", "Likely")
NORMAL_IMPRESSIONS = (
    "No acute cardiopulmonary abnormality.",
    "Normal CT of the chest.",
    "No acute intrathoracic abnormality.",
)

# Statements of normal anatomy that name no finding kind, keyed by section, with
# the finding kinds that rule them out. In the lungs only a drawn finding rules a
# statement out, because "The lungs are clear. No consolidation." reads well.
# Elsewhere any finding of those kinds does, so "No cardiomegaly." is not
# repeated as "Heart size is normal."
BOILERPLATE = {
    "lungs": (
        (("The lungs are clear.", "Both lungs are clear.", "The lungs are well aerated and clear."),
         ("nodule", "mass", "consolidation", "ground_glass", "atelectasis", "emphysema")),
        (("The central airways are patent.", "The trachea and main bronchi are patent."), ()),
    ),
    "pleura": (
        (("The pleural spaces are clear.", "The pleura is unremarkable."), ("pleural_effusion", "pneumothorax")),
    ),
    "heart": (
        (("Heart size is normal.", "The heart is normal in size."), ("cardiomegaly",)),
        (("The pericardium is unremarkable.",), ("pericardial_effusion",)),
        (("The thoracic aorta is normal in caliber.", "No mediastinal or hilar lymphadenopathy."), ()),
    ),
    "bones": (
        (("No acute osseous abnormality.", "The visualized osseous structures are unremarkable.",
          "Mild degenerative changes of the thoracic spine."), ()),
    ),
}
SECTION_HEADINGS = {
    "lungs": ("LUNGS AND AIRWAYS:", "Lungs:"),
    "pleura": ("PLEURA:", "Pleura:"),
    "heart": ("HEART AND MEDIASTINUM:", "Heart and mediastinum:"),
    "bones": ("BONES:", "Bones:"),
}

# Words that mark a negated or a hedged statement in the text this module writes.
NEGATION_CUES = ("no", "not", "negative for", "absent", "without")
HEDGE_CUES = ("possible", "probable", "likely", "cannot exclude", "suspicious for", "questionable", "may",
              "suspected")
