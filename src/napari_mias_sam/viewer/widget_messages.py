"""The dock's message bar: warnings and errors that stay until they no longer apply (unlike
napari's toasts, which vanish and cut long text), shown in full and selectable for copying."""

from typing import Optional

from qtpy.QtCore import Qt
from qtpy.QtWidgets import QLabel, QSizePolicy, QWidget

__all__ = ["MessageBar", "LEVELS"]

#: Message levels and their colours (border, text).
LEVELS = {"info": ("#5a8dd6", "#dfe7f3"), "warning": ("#e0a030", "#f6e3bd"), "error": ("#e05050", "#f8d0d0")}


class MessageBar(QLabel):
    """A persistent, word-wrapped message with a coloured edge; hidden when empty.

    ``show_message(text, level)`` replaces the message; ``clear(level)`` removes it (only when it
    is of that level, so a fixed warning does not hide an error).
    """

    def __init__(self, parent: Optional[QWidget] = None) -> None:
        super().__init__(parent)
        self.level: Optional[str] = None
        self.setWordWrap(True)
        self.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        self.setVisible(False)

    def show_message(self, text: str, level: str = "info") -> None:
        if level not in LEVELS:
            raise ValueError(f"level must be one of {', '.join(LEVELS)}, got {level!r}")
        edge, fg = LEVELS[level]
        self.level = level
        self.setStyleSheet(f"QLabel {{ border-left: 4px solid {edge}; padding: 3px 6px; color: {fg}; }}")
        self.setText(f"{level}: {text}" if level != "info" else text)
        self.setToolTip(text)
        self.setVisible(True)

    def clear(self, level: Optional[str] = None) -> None:  # type: ignore[override]
        if level is None or level == self.level:
            super().clear()
            self.level = None
            self.setVisible(False)
