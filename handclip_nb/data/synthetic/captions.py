"""Caption text of one synthetic photo, built from the person and what the photo shows.

Not to be confused with :mod:`handclip_nb.data.captions`, the reader of the ``captions.csv``
files that :mod:`.writers` fills with these captions.
"""

from __future__ import annotations

from .constants import ASPECTS
from .people import SyntheticPerson

__all__ = ["caption_phrases", "caption_for"]


def caption_phrases(person: SyntheticPerson, aspect: str,
                    accessory_phrase: str | None = None) -> list[str]:
    """The caption of one photo as phrases: the view first, then what the photo shows.

    Only what is visible goes in: nails (and their polish) are drawn on the dorsal side only,
    marks only on their own surface (:meth:`SyntheticPerson.visible_marks`). Proportions are
    included because they are visible and identity-specific; age is not (not drawn).
    """
    if aspect not in ASPECTS:
        raise ValueError(f"aspect must be one of {list(ASPECTS)}, got {aspect!r}")
    view, side = aspect.split()
    owner = "woman's" if person.gender == "female" else "man's"
    surface = "dorsal side" if view == "dorsal" else "palm side"
    g = person.geometry
    phrases = [f"a photo of the {surface} of a {owner} {side} hand", person.skin_tone_name]
    if view == "dorsal":
        phrases.append(f"{person.nail_polish} nail polish" if person.nail_polish
                       else "unpolished nails")
    phrases.append("long fingers" if g.finger_lengths[2] / g.palm_height > 0.82
                   else "short fingers")
    phrases.append("broad palm" if g.palm_width > 1.0 else "narrow palm")
    if accessory_phrase:
        phrases.append(accessory_phrase)
    phrases.extend(m.describe() for m in person.visible_marks(view))
    return phrases


def caption_for(person: SyntheticPerson, aspect: str, accessory_phrase: str | None = None) -> str:
    """One photo's caption, e.g. "a photo of the dorsal side of a woman's right hand, medium
    skin, red nail polish, long fingers, narrow palm, a gold ring on the ring finger, mole on
    the back of the hand" (phrases joined by ", ")."""
    return ", ".join(caption_phrases(person, aspect, accessory_phrase))
