"""The synthetic racing world: random closed tracks, an expert driver and the car's two sensors.

Modules (import them directly; this package imports none of them eagerly):

- ``e2r.sim.track``    closed race tracks: centre line, walls, barrels, ground paint
- ``e2r.sim.expert``   the expert driver (pure pursuit + curvature-limited speed on a kinematic bicycle)
- ``e2r.sim.sensors``  the LiDAR and the front camera, ray cast against the same scene
- ``e2r.sim.world``    the world written as a dataset in the docs/CONTRACTS.md layout (``generate_dataset``)
- ``e2r.sim.preview``  a preview PNG of one recorded frame (LiDAR BEV, camera, projected points)
- ``e2r.sim.tiny``     tiny fake datasets in the same layout (random points and images), for tests and
  benchmarks
"""
