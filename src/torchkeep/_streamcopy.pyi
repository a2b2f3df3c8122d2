# Types of the optional C extension built from _streamcopy.c (absent where no compiler was).
import numpy as np
from typing_extensions import Buffer

LEVEL: int
MIN_STREAM_BYTES: int

# Any buffer; ndarray named too, as numpy's stubs declare its buffer protocol only for 3.12+.
def copy(dst: Buffer | np.ndarray, src: Buffer | np.ndarray, level: int = ..., /) -> None: ...
