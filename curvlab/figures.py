"""What every figure of the report shares: a matplotlib ``Figure`` rendered as PNG bytes."""

import io

from matplotlib.figure import Figure


def png(figure: Figure) -> bytes:
    """The PNG encoding of ``figure`` (drawn without pyplot, so no display or global state is touched)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
