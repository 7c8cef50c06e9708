/** Shared by the MPI tests: where mpirun is and how to start 2 ranks on this machine. */

/** `mpirun` on the PATH, or null. */
export function mpirun(): string | null {
  for (const dir of (Deno.env.get("PATH") ?? "").split(":")) {
    try {
      if (Deno.statSync(`${dir}/mpirun`).isFile) return `${dir}/mpirun`;
    } catch {
      // not here
    }
  }
  return null;
}

/** mpirun, or null after saying why the test is skipped (a failure under QGALORE_REQUIRE_MPI=1). */
export function mpirunOrSkip(): string | null {
  const bin = mpirun();
  if (bin) return bin;
  if (Deno.env.get("QGALORE_REQUIRE_MPI") === "1") {
    throw new Error("mpirun not found but QGALORE_REQUIRE_MPI=1");
  }
  console.log("skipped: mpirun not found (install openmpi-bin libopenmpi-dev)");
  return null;
}

/** Flags for 2 ranks on this machine over the loopback interface. */
export const MPIRUN_FLAGS = [
  "-np",
  "2",
  "--oversubscribe",
  "--mca",
  "btl",
  "self,tcp",
  "--mca",
  "btl_tcp_if_include",
  "lo",
];

/** Lets mpirun start ranks as root (CI containers). */
export const MPIRUN_ENV = {
  OMPI_ALLOW_RUN_AS_ROOT: "1",
  OMPI_ALLOW_RUN_AS_ROOT_CONFIRM: "1",
};
