//! Parquet export through the `parquet` crate's low-level column writers, without Arrow (Arrow
//! would multiply the build time on small machines for a flat table of a few columns). The columns
//! are the CSV export's, typed (INT64, DOUBLE, BOOLEAN, UTF8 strings), all OPTIONAL so the
//! not-judged nulls survive; one row group, uncompressed (outputs are text that readers compress
//! better themselves if they need to).

use std::path::Path;
use std::sync::Arc;

use parquet::basic::{ConvertedType, Repetition, Type as PhysicalType};
use parquet::data_type::{BoolType, ByteArray, ByteArrayType, DoubleType, Int64Type};
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::types::Type;

use super::flat::{flat, Cell, Kind};
use super::store::RowView;
use crate::{Error, Result};

fn pq_err(path: &Path, e: parquet::errors::ParquetError) -> Error {
    Error::io(path, std::io::Error::other(format!("parquet: {e}")))
}

/// Write `rows` as a Parquet file.
pub fn write(rows: &[RowView], path: &Path) -> Result<()> {
    let (cols, data) = flat(rows);
    let e = |x| pq_err(path, x);
    let fields = cols
        .iter()
        .map(|(name, kind)| {
            let b = match kind {
                Kind::Int => Type::primitive_type_builder(name, PhysicalType::INT64),
                Kind::Float => Type::primitive_type_builder(name, PhysicalType::DOUBLE),
                Kind::Bool => Type::primitive_type_builder(name, PhysicalType::BOOLEAN),
                Kind::Text => Type::primitive_type_builder(name, PhysicalType::BYTE_ARRAY)
                    .with_converted_type(ConvertedType::UTF8),
            };
            b.with_repetition(Repetition::OPTIONAL)
                .build()
                .map(Arc::new)
        })
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(e)?;
    let schema = Arc::new(
        Type::group_type_builder("study_rows")
            .with_fields(fields)
            .build()
            .map_err(e)?,
    );
    let file = std::fs::File::create(path).map_err(|x| Error::io(path, x))?;
    let props = Arc::new(WriterProperties::builder().build());
    let mut w = SerializedFileWriter::new(file, schema, props).map_err(e)?;
    let mut rg = w.next_row_group().map_err(e)?;
    let mut ci = 0usize;
    while let Some(mut col) = rg.next_column().map_err(e)? {
        let cells = data.iter().map(|r| &r[ci]);
        let def: Vec<i16> = cells.clone().map(|c| (*c != Cell::Null) as i16).collect();
        match cols[ci].1 {
            Kind::Int => {
                let v: Vec<i64> = cells
                    .filter_map(|c| match c {
                        Cell::Int(i) => Some(*i),
                        _ => None,
                    })
                    .collect();
                col.typed::<Int64Type>()
                    .write_batch(&v, Some(&def), None)
                    .map_err(e)?;
            }
            Kind::Float => {
                let v: Vec<f64> = cells
                    .filter_map(|c| match c {
                        Cell::Float(f) => Some(*f),
                        _ => None,
                    })
                    .collect();
                col.typed::<DoubleType>()
                    .write_batch(&v, Some(&def), None)
                    .map_err(e)?;
            }
            Kind::Bool => {
                let v: Vec<bool> = cells
                    .filter_map(|c| match c {
                        Cell::Bool(b) => Some(*b),
                        _ => None,
                    })
                    .collect();
                col.typed::<BoolType>()
                    .write_batch(&v, Some(&def), None)
                    .map_err(e)?;
            }
            Kind::Text => {
                let v: Vec<ByteArray> = cells
                    .filter_map(|c| match c {
                        Cell::Text(s) => Some(ByteArray::from(s.as_str())),
                        _ => None,
                    })
                    .collect();
                col.typed::<ByteArrayType>()
                    .write_batch(&v, Some(&def), None)
                    .map_err(e)?;
            }
        }
        col.close().map_err(e)?;
        ci += 1;
    }
    rg.close().map_err(e)?;
    w.close().map_err(e)?;
    Ok(())
}
