"""Chest CT phantoms: each patient drawn as a plan (no pixels), then rendered slice by slice.

Each patient is a numerical phantom (body, fat, muscle, ribs, spine, mediastinum,
heart, liver, two lungs with vessels) rendered slice by slice with vectorised
numpy; anatomy and lesions are 3-D objects parametrised along the scan, so
neighbouring slices are coherent. :func:`plan_cohort` draws every patient's
parameters (class, lesions, findings that are not pneumonia, acquisition
nuisances); :class:`Phantom` renders a plan's slices in HU with their lesion
masks. :mod:`msnet.data.synthetic` writes them as DICOM series and manifests;
its docstring describes the classes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from msnet.data.splits import carve
from msnet.errors import MsnetError

MIN_LESION_FRACTION = 3e-4
"""A slice counts as infected when its lesions cover at least this fraction of the image
(about 7.5 mm across at 512 px): a reader would not label the tip of a blob that shows as
a few pixels, and neither do we."""
LUNG_HEIGHT_MM = (230.0, 290.0)
"""Lung apex to base of the phantoms (adults at full inspiration): the slice spacing follows from it and the
slice count, so that every phantom holds adult-sized lungs (3-6 l) and passes the lung gate."""
GGO_HU = (-700.0, -300.0)
CONSOLIDATION_HU = (-100.0, 50.0)
MIN_LESION_SLICES = 3
"""Every lesion reaches over at least this many slices (binds only for small lesions on coarse scans)."""
_N_FIELDS = 8  # vessel bases A0..A3, lesion shape, lesion texture, septa, bronchi


@dataclass
class Lesion:
    """One 3-D lesion in lung coordinates (u: 0 = lung apex, 1 = lung base)."""

    side: int  # -1 = patient right (image left), +1 = patient left
    u_center: float
    u_radius: float
    angle: float  # position inside the lung ellipse, radians (0 = image right)
    rho: float  # radial position as a fraction of the lung semi-axes
    rx: float  # semi-axes as fractions of the lung's largest semi-axes
    ry: float
    hu: float
    kind: str  # "ggo" or "consolidation"
    crazy_paving: bool = False
    lobe: str = ""  # "upper", "middle" or "lower": bounded by that lobe's fissures ("" = crosses them)


@dataclass
class Nodule:
    """A small round finding that is not pneumonia (solid or calcified), in lung coordinates."""

    side: int
    u_center: float
    angle: float
    rho: float  # radial position as a fraction of the lung's semi-axes at its level
    diameter_mm: float
    hu: float


@dataclass
class Band:
    """Dependent atelectasis: a subpleural band along the posterior lung from u_top down to the base."""

    side: int
    u_top: float
    thickness_mm: float
    hu: float


@dataclass
class PatientPlan:
    """Everything that defines one synthetic patient (no pixels).

    >>> plan = plan_cohort(3, size=64, slices=(8, 10))[0]
    >>> plan.patient_id, 8 <= plan.n_slices <= 10
    ('SYN0001', True)
    """

    patient_id: str
    label: str
    subset: str
    index: int
    seed: int
    n_slices: int
    thickness_mm: float
    spacing_mm: float
    pixel_spacing_mm: float
    noise_hu: float
    body_fraction: float  # body half-width / field of view
    body_aspect: float  # body half-height / half-width
    z_top_mm: float
    lung_apex_t: float
    lung_base_t: float
    instance_reversed: bool  # True: InstanceNumber 1 is the most inferior slice
    naming: str  # "im", "hex" or "textrank"
    lesions: list[Lesion] = field(default_factory=list)
    nodules: list[Nodule] = field(default_factory=list)  # distractors, any class, never labelled
    bands: list[Band] = field(default_factory=list)


def rng_stream(seed: int, *keys: int) -> np.random.Generator:
    """The random stream of a seed and keys (patient index, purpose): streams never share draws."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, *keys])


def _lung_profile(u: float) -> float:
    """Relative lung size along the lung (0 at apex and base, 1 at its widest)."""
    if u <= 0.0 or u >= 1.0:
        return 0.0
    if u < 0.62:
        return float((u / 0.62) ** 0.5)
    return float(np.sqrt(max(0.0, 1.0 - ((u - 0.62) / 0.38) ** 2)))


def _lung_u(plan: PatientPlan) -> np.ndarray:
    t = np.linspace(0.0, 1.0, plan.n_slices)
    return (t - plan.lung_apex_t) / (plan.lung_base_t - plan.lung_apex_t)


def _draw_lesions(label: str, plan: PatientPlan, rng: np.random.Generator) -> list[Lesion]:
    """Lesions for one class, placed by anatomy (no resampling towards any coverage)."""
    if label.upper() == "NORMAL" or label.upper().startswith("NON"):
        return []
    lesions = _covid_lesions(rng) if "COVID" in label.upper() else _cap_lesions(rng)
    # readers label a pneumonia that shows on a few neighbouring slices: on coarse scans (few slices
    # over the lung) a small lesion is stretched along z to reach over MIN_LESION_SLICES slices
    n_lung = max(1.0, (plan.n_slices - 1) * (plan.lung_base_t - plan.lung_apex_t))
    for les in lesions:
        les.u_radius = max(les.u_radius, (0.5 * MIN_LESION_SLICES + 0.5) / n_lung)
    return lesions


def _covid_lesions(rng: np.random.Generator) -> list[Lesion]:
    """COVID-19's typical pattern: multifocal rounded or patchy ground-glass opacities (2.5-4.5 cm from top
    to bottom, 4-9 cm across where the lung is wide enough) in both lungs, peripheral (subpleural),
    posterior and lateral more than anterior, lower lobes
    more than upper; mostly mild, as in the first week of symptoms when most patients are scanned (one
    focus per lung in half of the lungs, two or three in the others). Foci lie on a few slices each,
    spread along the lungs: among 100-300 slices (or the demo's 30-60) most slices are clean."""
    out = []
    for side in (-1, 1):
        lateral = np.pi if side < 0 else 0.0  # lateral wall of this lung (image y grows posteriorly)
        for _ in range(int(rng.choice([1, 1, 2, 3]))):
            uc = rng.uniform(0.45, 0.9) if rng.random() < 0.65 else rng.uniform(0.12, 0.45)
            where = rng.choice(4, p=[0.3, 0.3, 0.3, 0.1])  # lateral, posterolateral, posterior, anterior
            angle = [lateral, (lateral + np.pi / 2) / 2, np.pi / 2, -np.pi / 2][where] + rng.uniform(-0.35, 0.35)
            out.append(Lesion(side, float(uc), float(rng.uniform(0.05, 0.09)), float(angle),
                              float(rng.uniform(0.65, 0.88)), float(rng.uniform(0.45, 0.75)),
                              float(rng.uniform(0.4, 0.65)), float(rng.uniform(-600.0, -350.0)), "ggo",
                              bool(rng.random() < 0.3)))
    return out


_LOBES = {  # CAP's lobe: (probability, centre range along the lung, centre angle range)
    "lower": (0.55, (0.5, 0.85), (0.2 * np.pi, 0.8 * np.pi)),  # posterior and basal
    "upper": (0.3, (0.12, 0.4), (-np.pi, np.pi)),
    "middle": (0.15, (0.55, 0.75), (-0.8 * np.pi, -0.2 * np.pi)),  # right middle lobe / lingula, anterior
}
def _cap_lesions(rng: np.random.Generator) -> list[Lesion]:
    """Community-acquired (bacterial) pneumonia: one dense consolidation with air bronchograms in one lung,
    bounded by its lobe's fissures, wide in the axial plane (a wedge on the pleura) and from a subsegment
    to half a lobe from top to bottom (2-6 cm, spread evenly on a log scale): one contiguous run of a few
    slices."""
    names = list(_LOBES)
    lobe = names[int(rng.choice(len(names), p=[_LOBES[k][0] for k in names]))]
    _, (u_lo, u_hi), (a_lo, a_hi) = _LOBES[lobe]
    half_length_mm = 0.5 * float(np.exp(rng.uniform(np.log(20.0), np.log(60.0))))
    return [Lesion(int(rng.choice([-1, 1])), float(rng.uniform(u_lo, u_hi)), half_length_mm / float(np.mean(LUNG_HEIGHT_MM)),
                   float(rng.uniform(a_lo, a_hi)), float(rng.uniform(0.3, 0.6)), float(rng.uniform(0.5, 0.8)),
                   float(rng.uniform(0.45, 0.75)), float(rng.uniform(-60.0, 30.0)), "consolidation", lobe=lobe)]


def _draw_distractors(plan: PatientPlan, rng: np.random.Generator) -> None:
    """Findings that are not pneumonia and that any class has (drawn without the class): small solid or
    calcified nodules (granulomas, intrapulmonary lymph nodes) and dependent atelectasis, a thin
    subpleural band of higher density along the posterior lung bases of a supine patient."""
    plan.nodules = [Nodule(int(rng.choice([-1, 1])), float(rng.uniform(0.1, 0.9)), float(rng.uniform(-np.pi, np.pi)),
                           float(rng.uniform(0.0, 0.8)), float(rng.uniform(4.0, 10.0)),
                           float(rng.uniform(200.0, 500.0) if rng.random() < 0.3 else rng.uniform(20.0, 60.0)))
                    for _ in range(int(rng.choice([0, 0, 1, 1, 2, 3])))]
    plan.bands = []
    if rng.random() < 0.35:
        sides = (-1, 1) if rng.random() < 0.7 else (int(rng.choice([-1, 1])),)
        plan.bands = [Band(side, float(rng.uniform(0.55, 0.8)), float(rng.uniform(3.0, 8.0)),
                           float(rng.uniform(-450.0, -200.0))) for side in sides]


def _split_subsets(labels: list[str], seed: int, split: tuple[float, float] = (0.2, 0.2)) -> list[str]:
    """Stratified train/val/test per class (val and test fractions; 60/20/20 by default), deterministic per seed."""
    ids = [str(i) for i in range(len(labels))]
    rest, test = carve(ids, labels, split[1], seed)
    _, val = carve(rest, [labels[int(i)] for i in rest], split[0] / max(1e-9, 1.0 - split[1]), seed + 1)
    subsets = ["train"] * len(labels)
    for i in val:
        subsets[int(i)] = "val"
    for i in test:
        subsets[int(i)] = "test"
    return subsets


def plan_cohort(n_patients: int, size: int = 512, seed: int = 0, slices: tuple[int, int] = (60, 200),
                classes: tuple[str, ...] = ("COVID-19", "CAP", "NORMAL"),
                thickness_mm: tuple[float, float] = (1.0, 5.0),
                split: tuple[float, float] = (0.2, 0.2)) -> list[PatientPlan]:
    """Draw every patient's parameters (classes evenly split; nuisances independent of class).

    >>> [p.label for p in plan_cohort(3, seed=1)].count("CAP")
    1
    """
    if n_patients < 1:
        raise MsnetError(f"n_patients must be at least 1, got {n_patients}", fix="pass --patients N with N >= 1")
    lo, hi = int(slices[0]), int(slices[1])
    if lo < 2 or hi < lo:
        raise MsnetError(f"bad slice range {slices}", fix="pass min_slices >= 2 and max_slices >= min_slices")
    t_lo, t_hi = float(thickness_mm[0]), float(thickness_mm[1])
    if t_lo <= 0 or t_hi < t_lo:
        raise MsnetError(f"bad thickness range {thickness_mm}", fix="pass 0 < min <= max (mm)")
    if not classes:
        raise MsnetError("no classes given", fix="pass at least one class name")
    crng = rng_stream(seed, 0xC1A55)
    labels = [classes[i % len(classes)] for i in range(n_patients)]
    labels = [labels[j] for j in crng.permutation(n_patients)]
    subsets = _split_subsets(labels, seed, split)
    # planted traps on exactly half of the patients, independent of class
    reversed_ids = set(crng.permutation(n_patients)[: n_patients // 2].tolist())
    plans = []
    for i in range(n_patients):
        nr = rng_stream(seed, i, 1)  # nuisance stream: never sees the class
        thick = round(float(nr.uniform(t_lo, t_hi)), 2)
        if nr.random() >= 0.5:  # a draw that once chose the spacing: kept so that every later draw is as before
            nr.uniform(t_lo, thick)
        plan = PatientPlan(
            patient_id=f"SYN{i + 1:04d}", label=labels[i], subset=subsets[i], index=i, seed=seed,
            n_slices=int(nr.integers(lo, hi + 1)), thickness_mm=thick, spacing_mm=0.0,
            pixel_spacing_mm=round(float(nr.uniform(0.6, 0.9)) * 512.0 / size, 4),
            noise_hu=float(nr.uniform(10.0, 40.0)), body_fraction=float(nr.uniform(0.39, 0.46)),
            body_aspect=float(nr.uniform(0.62, 0.74)), z_top_mm=round(float(nr.uniform(-80.0, 0.0)), 2),
            lung_apex_t=float(nr.uniform(0.03, 0.12)), lung_base_t=float(nr.uniform(0.82, 0.95)),
            instance_reversed=i in reversed_ids, naming=str(nr.choice(["im", "hex", "textrank"])),
        )
        # adult lungs (apex to base 230-290 mm) whatever the slice count: the spacing follows
        height = float(rng_stream(seed, i, 6).uniform(*LUNG_HEIGHT_MM))
        plan.spacing_mm = round(height / ((plan.n_slices - 1) * (plan.lung_base_t - plan.lung_apex_t)), 3)
        plan.lesions = _draw_lesions(plan.label, plan, rng_stream(seed, i, 3))
        _draw_distractors(plan, rng_stream(seed, i, 7))  # a stream of its own: never sees the class
        plans.append(plan)
    return plans


def _smooth_fields(rng: np.random.Generator, size: int, n: int) -> np.ndarray:
    """n smooth random fields (n, size, size), zero mean, unit std, float32."""
    white = rng.standard_normal((n, size, size), dtype=np.float32)
    f = np.fft.rfftfreq(size)[None, :] ** 2 + np.fft.fftfreq(size)[:, None] ** 2
    # correlation length per field, as a fraction of the image (scale-invariant)
    sig = np.array([0.012, 0.014, 0.016, 0.013, 0.02, 0.02, 0.006, 0.011])[:n] * size
    spec = np.fft.rfft2(white) * np.exp(-2 * (np.pi ** 2) * f[None] * sig[:, None, None] ** 2)
    out = np.fft.irfft2(spec, s=(size, size)).astype(np.float32)
    out -= out.mean(axis=(1, 2), keepdims=True)
    out /= out.std(axis=(1, 2), keepdims=True) + 1e-6
    return out


def _ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, a: float, b: float) -> np.ndarray:
    """Boolean mask of an axis-aligned ellipse, computed only in its bounding box."""
    mask = np.zeros((y.size, x.size), dtype=bool)
    if a <= 0 or b <= 0:
        return mask
    c0, c1 = np.searchsorted(x, [cx - a, cx + a])
    r0, r1 = np.searchsorted(y, [cy - b, cy + b])
    if c1 <= c0 or r1 <= r0:
        return mask
    dx = ((x[c0:c1] - cx) / a) ** 2
    dy = ((y[r0:r1] - cy) / b) ** 2
    mask[r0:r1, c0:c1] = (dy[:, None] + dx[None, :]) < 1.0
    return mask


class Phantom:
    """Renders the slices of one planned patient in canonical order (0 = most superior).

    >>> ph = Phantom(plan_cohort(1, size=64, slices=(8, 8))[0], size=64)
    >>> hu, lesion = ph.render(4)
    >>> hu.shape, lesion.dtype
    ((64, 64), dtype('bool'))
    """

    def __init__(self, plan: PatientPlan, size: int):
        self.plan, self.size = plan, size
        ps = plan.pixel_spacing_mm
        coords = (np.arange(size, dtype=np.float32) - (size - 1) / 2.0) * ps
        self.x = self.y = coords
        fov = size * ps
        self.a0 = plan.body_fraction * fov
        self.b0 = self.a0 * plan.body_aspect
        arng = rng_stream(plan.seed, plan.index, 2)  # anatomy stream
        self.fields = _smooth_fields(arng, size, _N_FIELDS)
        xn, yn = coords[None, :] / self.a0, coords[:, None] / self.b0
        self.r0 = np.sqrt(xn ** 2 + yn ** 2).astype(np.float32)
        theta = np.arctan2(yn, xn)
        self.rib_c, self.rib_s = np.cos(12 * theta).astype(np.float32), np.sin(12 * theta).astype(np.float32)
        self.rib_gap = (np.abs(np.sin(theta)) < 0.93).astype(np.float32)  # no ribs at spine/sternum
        self.inv_vessel_w = (1.0 / (0.09 * np.clip(1.45 - 1.3 * np.abs(xn), 0.25, None))).astype(np.float32)
        self.ydep = (25.0 * np.clip(coords[:, None] / self.b0, -1, 1)).astype(np.float32)
        self.freq = arng.uniform(1.5, 4.0, 4)
        self.phase = arng.uniform(0, 2 * np.pi, 4)
        self.rib_phase = arng.uniform(0, 2 * np.pi)
        self.min_area = max(4, int(0.0012 * size * size))
        self.u = _lung_u(plan)
        self.lung_height_mm = (plan.n_slices - 1) * plan.spacing_mm * (plan.lung_base_t - plan.lung_apex_t)

    def _body(self, t: float) -> float:
        return 0.93 + 0.07 * float(np.sin(np.pi * t))

    def render(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(HU float32 (size, size) with noise, lesion mask) of canonical slice i."""
        plan, x, y = self.plan, self.x, self.y
        n = plan.n_slices
        t = i / max(1, n - 1)
        u = float(self.u[i])
        g = self._body(t)
        r = self.r0 / g
        hu = np.select([r < 0.84, r < 0.9, r < 0.955, r < 1.0], [35.0, 50.0, -100.0, 30.0], -1000.0)
        hu = hu.astype(np.float32)
        a, b = 0.84 * self.a0 * g, 0.84 * self.b0 * g  # thoracic cavity semi-axes
        # ribs: ring of bone segments that move smoothly along z
        phi = 2 * np.pi * 7 * t + self.rib_phase
        ribs = (r > 0.855) & (r < 0.895) & ((self.rib_c * np.cos(phi) - self.rib_s * np.sin(phi)) * self.rib_gap > 0.45)
        hu[ribs] = 550.0
        # spine: vertebral body (cortical rim + cancellous core), canal, spinous process
        vb_y, vb_r = 0.66 * b, 0.15 * b
        hu[_ellipse(x, y, 0.0, vb_y, vb_r, vb_r)] = 650.0
        hu[_ellipse(x, y, 0.0, vb_y, 0.8 * vb_r, 0.8 * vb_r)] = 280.0
        hu[_ellipse(x, y, 0.0, vb_y + 1.45 * vb_r, 0.45 * vb_r, 0.45 * vb_r)] = 15.0
        hu[_ellipse(x, y, 0.0, vb_y + 2.3 * vb_r, 0.25 * vb_r, 0.55 * vb_r)] = 500.0
        if 0.05 < t < 0.75:
            hu[_ellipse(x, y, 0.0, -0.93 * b, 0.09 * a, 0.05 * b)] = 450.0  # sternum
        # mediastinum, heart, aorta, liver
        block = _ellipse(x, y, 0.0, -0.1 * b, 0.17 * a, 0.78 * b)
        h = float(np.clip(np.sin(np.pi * (u - 0.35) / 0.75), 0.0, 1.0)) if 0.35 < u < 1.1 else 0.0
        if h > 0:
            heart = _ellipse(x, y, 0.13 * a, -0.22 * b, 0.33 * a * h, 0.42 * b * h)
            hu[heart] = 42.0
            block |= heart
        aorta = _ellipse(x, y, 0.16 * a, 0.45 * b, 0.08 * a, 0.08 * a)
        hu[aorta] = 45.0
        block |= aorta | _ellipse(x, y, 0.0, vb_y, vb_r * 1.1, vb_r * 1.1)
        liver_s = float(np.clip((u - 0.72) / 0.3, 0.0, 1.0)) ** 0.5 if u > 0.72 else 0.0
        if liver_s > 0:
            liver = _ellipse(x, y, -0.3 * a, 0.0, 0.6 * a * liver_s, 0.75 * b * liver_s)
            hu[liver] = 60.0
            block |= liver
        # lungs with vessels
        prof = _lung_profile(u)
        lesion = np.zeros((self.size, self.size), dtype=bool)
        if prof > 0.02:
            lung = (_ellipse(x, y, -0.47 * a, 0.04 * b, 0.41 * a * prof, 0.8 * b * prof)
                    | _ellipse(x, y, 0.47 * a, 0.04 * b, 0.41 * a * prof, 0.8 * b * prof))
            lung &= (r < 0.84) & ~block
            c = np.cos(2 * np.pi * self.freq * t + self.phase).astype(np.float32)
            fv = c[0] * self.fields[0] + c[1] * self.fields[1] + c[2] * self.fields[2] + c[3] * self.fields[3]
            vessel = np.clip(1.0 - np.abs(fv) * self.inv_vessel_w, 0.0, 1.0)
            par = -860.0 + self.ydep + 900.0 * vessel
            hu[lung] = par[lung]
            for band in plan.bands:
                self._band(hu, lung, band, u, a, b, prof)
            for nod in plan.nodules:
                self._nodule(hu, lung, nod, u, a, b)
            for les in plan.lesions:
                self._lesion(hu, lung, lesion, les, u, a, b, vessel)
        hu += self.noise(i)
        return hu, lesion

    def noise(self, i: int) -> np.ndarray:
        rng = rng_stream(self.plan.seed, self.plan.index, 4, i)
        return rng.standard_normal((self.size, self.size), dtype=np.float32) * np.float32(self.plan.noise_hu)

    def _lesion(self, hu: np.ndarray, lung: np.ndarray, lesion: np.ndarray, les: Lesion, u: float,
                a: float, b: float, vessel: np.ndarray) -> None:
        d = (u - les.u_center) / les.u_radius
        if abs(d) >= 1.0:
            return
        k2 = 1.0 - d * d
        cx = les.side * 0.47 * a + les.rho * 0.41 * a * np.cos(les.angle)
        cy = 0.04 * b + les.rho * 0.8 * b * np.sin(les.angle)
        rx, ry = les.rx * 0.41 * a, les.ry * 0.8 * b
        x, y = self.x, self.y
        c0, c1 = np.searchsorted(x, [cx - 1.4 * rx, cx + 1.4 * rx])
        r0, r1 = np.searchsorted(y, [cy - 1.4 * ry, cy + 1.4 * ry])
        if c1 <= c0 or r1 <= r0:
            return
        box = np.s_[r0:r1, c0:c1]
        dist = ((y[r0:r1, None] - cy) / ry) ** 2 + ((x[None, c0:c1] - cx) / rx) ** 2
        m = (dist + 0.3 * self.fields[4][box] < k2) & lung[box]
        if les.lobe:
            m &= self._lobe(les.lobe, u, y[r0:r1], b)[:, None]
        if m.sum() < self.min_area:
            return
        val = les.hu + 45.0 * self.fields[5][box]
        if les.kind == "ggo":
            val = np.maximum(val, -860.0 + 900.0 * vessel[box])  # vessels stay visible through GGO
            if les.crazy_paving:
                val = np.where(np.abs(self.fields[6][box]) < 0.12, val + 260.0, val)  # thin septa
        else:
            val = np.where(np.abs(self.fields[7][box]) < 0.1, -900.0, val)  # air bronchograms
        hu[box] = np.where(m, val, hu[box])
        lesion[box] |= m


    @staticmethod
    def _lobe(lobe: str, u: float, y: np.ndarray, b: float) -> np.ndarray:
        """Rows y (image y grows posteriorly) of a slice at lung level u that belong to a lobe. The major
        fissure runs from the back at u = 0.25 to the front at the base; the minor fissure (right) and
        the lingula's border (left) lie at u = 0.5."""
        prof = max(_lung_profile(u), 1e-3)
        yn = (y - 0.04 * b) / (0.8 * b * prof)  # -1 anterior .. +1 posterior edge of the lung
        fissure = 1.0 - 2.0 * (u - 0.25) / 0.7
        if lobe == "lower":
            return yn > fissure
        if (lobe == "upper") != (u < 0.5):
            return np.zeros(y.shape, dtype=bool)
        return yn < fissure

    def _nodule(self, hu: np.ndarray, lung: np.ndarray, nod: Nodule, u: float, a: float, b: float) -> None:
        r = 0.5 * nod.diameter_mm
        dz = max(0.0, abs(u - nod.u_center) * self.lung_height_mm - 0.5 * self.plan.thickness_mm)
        if dz >= r:
            return
        prof = _lung_profile(nod.u_center)
        cx = nod.side * 0.47 * a + nod.rho * 0.41 * a * prof * np.cos(nod.angle)
        cy = 0.04 * b + nod.rho * 0.8 * b * prof * np.sin(nod.angle)
        rv = float(np.sqrt(r * r - dz * dz))
        m = _ellipse(self.x, self.y, cx, cy, rv, rv) & lung
        hu[m] = nod.hu

    def _band(self, hu: np.ndarray, lung: np.ndarray, band: Band, u: float, a: float, b: float, prof: float) -> None:
        if u <= band.u_top or u >= 1.0:
            return
        thick = band.thickness_mm * min(1.0, (u - band.u_top) / 0.12)
        cx, cy, ax, by = band.side * 0.47 * a, 0.04 * b, 0.41 * a * prof, 0.8 * b * prof
        x, y = self.x, self.y
        c0, c1 = np.searchsorted(x, [cx - ax, cx + ax])
        r0, r1 = np.searchsorted(y, [cy + 0.25 * by, cy + by])
        if c1 <= c0 or r1 <= r0:
            return
        box = np.s_[r0:r1, c0:c1]
        dx, dy = x[None, c0:c1] - cx, y[r0:r1, None] - cy
        rr = np.sqrt((dx / ax) ** 2 + (dy / by) ** 2)
        depth = np.sqrt(dx * dx + dy * dy) * (1.0 / np.maximum(rr, 1e-6) - 1.0)  # to the pleura along the ray
        m = (depth < thick) & lung[box]
        hu[box] = np.where(m, band.hu + 40.0 * self.fields[5][box], hu[box])
